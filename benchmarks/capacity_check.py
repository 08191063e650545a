"""The fast capacity search against a full simulation, on a grid of GPU kinds x request classes.

`skybroker.perf.capacity.max_rate` stops simulations early once the SLO is surely missed and
searches with regula falsi to a 5% bracket (or 2% of the SLO in latency). This script computes
the same capacities the slow way (every simulation run to the end, plain bisection to 0.5%)
and prints both, their ratio and the time each took, for the 8B chat example's request
classes and SLO on the bundled catalog's GPU kinds. Run with one thread:

    OMP_NUM_THREADS=1 python benchmarks/capacity_check.py [--gpus H100,L40S,A10G,T4] [--spec FILE]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

os.environ["SKYBROKER_PERF_CACHE"] = "0"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skybroker.catalog import load_catalog
from skybroker.perf.capacity import (
    CapacityResult,
    SLOTarget,
    _max_rate,
    _requests,
    rate_bound,
)
from skybroker.perf.roofline import RooflineModel
from skybroker.perf.simulator import SchedulerConfig, simulate
from skybroker.perf.workload import request_classes, workload_samples
from skybroker.plan_perf import gpu_replica, required_len, resolve_arch
from skybroker.spec import load_spec


def reference(model, cfg, cls, slo: SLOTarget, n: int, tol: float = 0.005) -> CapacityResult:
    """Bisection with complete simulations (no early stop), to `tol`."""
    arr, ins, outs = _requests(cls, n, 0)

    def ok(rate: float) -> tuple[bool, float, float]:
        ttft, tpot = simulate(model, cfg, arr / rate, ins, outs).percentile(slo.percentile)
        return ttft <= slo.ttft_s and tpot <= slo.tpot_s, ttft, tpot

    bound = rate_bound(model, cfg, cls, slo)  # 0: misses the SLO unloaded
    if bound.rate <= 0:
        return bound
    hi = bound.rate
    good, t1, t2 = ok(hi)
    if good:
        return CapacityResult(hi, t1, t2)
    lo = hi * 1e-3
    good, t1, t2 = ok(lo)
    if not good:
        return CapacityResult(0.0, t1, t2)
    best = (lo, t1, t2)
    while hi / lo - 1 > tol:
        mid = math.sqrt(lo * hi)
        good, t1, t2 = ok(mid)
        if good:
            lo, best = mid, (mid, t1, t2)
        else:
            hi = mid
    return CapacityResult(*best)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--spec",
        default=str(Path(__file__).resolve().parents[1] / "examples" / "chat-8b-us-eu.yaml"),
    )
    ap.add_argument("--gpus", default="H100,A100-80GB,L40S,A10G,L4,T4")
    ap.add_argument("--num-requests", type=int, default=80)
    a = ap.parse_args()
    spec = load_spec(Path(a.spec).read_text())
    cat = load_catalog()
    arch = resolve_arch(spec.model)
    classes = request_classes(*workload_samples(spec.workload))
    need = required_len(spec, arch, classes)
    e, s = spec.engine, spec.slo
    slo = SLOTarget(s.ttft_ms / 1000, s.tpot_ms / 1000, s.percentile)
    worst, t_fast, t_ref = 0.0, 0.0, 0.0
    print(f"{'gpu':10} {'class':20} {'fast req/s':>10} {'full req/s':>10} {'ratio':>7}")
    for gpu in a.gpus.split(","):
        fit = gpu_replica(arch, spec, cat, gpu, 8, need)
        if fit is None:
            print(f"{gpu:10} does not fit {arch.name}")
            continue
        hw, kv = fit
        model = RooflineModel(arch, hw)
        cfg = SchedulerConfig(e.max_num_seqs, e.max_num_batched_tokens, kv // e.block_size,
                              e.block_size)  # fmt: skip
        for cls in classes:
            t0 = time.perf_counter()
            fast = _max_rate(model, cfg, cls, slo, a.num_requests, 0, 0.05)
            t1 = time.perf_counter()
            ref = reference(model, cfg, cls, slo, a.num_requests)
            t2 = time.perf_counter()
            t_fast, t_ref = t_fast + t1 - t0, t_ref + t2 - t1
            ratio = fast.rate / ref.rate if ref.rate else (1.0 if not fast.rate else math.inf)
            worst = max(worst, abs(ratio - 1))
            print(f"{gpu:10} {cls.name:20} {fast.rate:10.3f} {ref.rate:10.3f} {ratio:7.3f}")
    print(f"max |fast / full - 1| = {worst:.1%}; search time fast {t_fast:.1f} s, full {t_ref:.1f} s "
          f"({t_ref / max(t_fast, 1e-9):.1f}x); load average {os.getloadavg()[0]:.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
