"""Does the planner predict what the engine really does? Simulator vs a real engine server.

For a measured profile (`python -m engine.profile`) and its model: the planner's scheduler
simulation (`skybroker.perf.simulator` on the profile's step-time fit) predicts TTFT and TPOT
p50/p99 at three request rates (light, near capacity, over capacity; capacity = the
simulator's highest rate meeting the SLO), then the serving benchmark (benchmarks/serve.py,
imported: same workload generator, same Poisson arrivals, same seed) measures them against a
real `python -m engine.serve` subprocess. Prints predicted, measured and the relative error,
and whether the SLO verdict (met / missed) agrees at each rate. Run with one torch thread:

    OMP_NUM_THREADS=1 python benchmarks/validate_perf.py --model DIR \
        --profile catalogs/profiles/tiny-llama-cpu.json
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve as bench  # noqa: E402  (benchmarks/serve.py: workload, load generator, server)

from skybroker.perf.capacity import SLOTarget, max_rate  # noqa: E402
from skybroker.perf.profile import ProfileModel, load  # noqa: E402
from skybroker.perf.simulator import SchedulerConfig, simulate  # noqa: E402
from skybroker.perf.workload import RequestClass  # noqa: E402


def arrivals(n: int, rate: float, seed: int) -> np.ndarray:
    """The arrival times benchmarks/serve.py's run_load draws for (rate, seed)."""
    rng = np.random.default_rng(seed)
    gaps = [float(rng.exponential(1.0 / rate)) for _ in range(n)]
    return np.concatenate([[0.0], np.cumsum(gaps[:-1])])


def pcts(x: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(x, 50)), float(np.percentile(x, 99))


def measured(results: list) -> tuple[np.ndarray, np.ndarray, int]:
    ok = [r for r in results if r.ok]
    ttft = np.array([r.ttft for r in ok])
    tpot = np.array([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    return ttft, tpot, len(results) - len(ok)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--profile", required=True)
    p.add_argument("--num-prompts", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-input-len", type=int, default=64)
    p.add_argument("--mean-output-len", type=int, default=16)
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--kv-cache-gib", type=float, default=0.25)
    p.add_argument("--slo-ttft-ms", type=float, default=3000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=600.0)
    p.add_argument("--rates", default="", help="comma-separated req/s (default: from capacity)")
    a = p.parse_args()

    from engine.loader import load_model_config

    vocab = load_model_config(a.model).vocab_size
    items = bench.make_workload(a.num_prompts, vocab, a.seed, a.mean_input_len,
                                a.mean_output_len, a.max_model_len)  # fmt: skip
    ins = np.array([len(i.prompt_token_ids) for i in items])
    outs = np.array([i.output_len for i in items])
    prof = load(a.profile)
    model = ProfileModel.of(prof)
    blocks = int(prof.engine.get("num_kv_blocks") or 10_000)
    cfg = SchedulerConfig(a.max_num_seqs, a.max_num_batched_tokens, blocks, 16)
    slo = SLOTarget(a.slo_ttft_ms / 1000, a.slo_tpot_ms / 1000, 99.0)
    cls = RequestClass("workload", 1.0, tuple(map(int, ins)), tuple(map(int, outs)))
    cap = max_rate(model, cfg, cls, slo, num_requests=a.num_prompts, seed=a.seed).rate
    rates = [float(r) for r in a.rates.split(",")] if a.rates else [0.3 * cap, 0.8 * cap, 1.5 * cap]
    print(f"profile {a.profile} ({prof.hardware_tag}); simulator capacity at SLO p99 TTFT <= "
          f"{a.slo_ttft_ms:g} ms, TPOT <= {a.slo_tpot_ms:g} ms: {cap:.3f} req/s")  # fmt: skip

    srv_args = SimpleNamespace(model=a.model, max_model_len=a.max_model_len,
                               max_num_seqs=a.max_num_seqs, kv_cache_gib=a.kv_cache_gib)  # fmt: skip
    proc, url = bench.start_server(srv_args)
    rows = []
    try:
        for rate in rates:
            sim = simulate(model, cfg, arrivals(len(items), rate, a.seed), ins, outs)
            load_before = os.getloadavg()[0]
            res, wall = asyncio.run(bench.run_load(url, "bench", items, rate, a.seed))
            ttft, tpot, failed = measured(res)
            rows.append((rate, sim, ttft, tpot, failed, load_before, wall))
    finally:
        proc.terminate()
        proc.wait(timeout=60)

    print(f"\n{'rate':>6} {'metric':>6} {'pct':>4} {'predicted':>10} {'measured':>10} {'error':>7}"
          f"   (load avg before)")  # fmt: skip
    for rate, sim, ttft, tpot, failed, la, wall in rows:
        for name, pred, meas in (("TTFT", sim.ttft, ttft), ("TPOT", sim.tpot, tpot)):
            for i, pct in enumerate(("p50", "p99")):
                pv, mv = pcts(pred)[i], pcts(meas)[i] if len(meas) else float("nan")
                print(f"{rate:6.3f} {name:>6} {pct:>4} {pv * 1e3:8.0f}ms {mv * 1e3:8.0f}ms "
                      f"{(pv - mv) / mv:+7.0%}   ({la:.1f})")  # fmt: skip
        ok_pred = pcts(sim.ttft)[1] <= slo.ttft_s and pcts(sim.tpot)[1] <= slo.tpot_s
        ok_meas = len(ttft) > 0 and pcts(ttft)[1] <= slo.ttft_s and pcts(tpot)[1] <= slo.tpot_s
        verdict = "agree" if ok_pred == ok_meas else "DISAGREE"
        print(f"{rate:6.3f}  SLO predicted {'met' if ok_pred else 'missed'}, measured "
              f"{'met' if ok_meas else 'missed'}: {verdict}; {failed} failed, {wall:.0f} s")  # fmt: skip


if __name__ == "__main__":
    main()
