"""Plan time on the full bundled catalog and on a 10x larger synthetic one.

    OMP_NUM_THREADS=1 python benchmarks/plan_speed.py

Prints, for a world-wide 8B chat spec (users in 8 areas, RTT <= 60 ms, spread and spot
constraints): the cold plan time (perf model computed), the warm plan time (perf cached), and
the ILP's build/solve time, status and gap; then the same on a catalog of 10 synthetic copies
of every region (jittered location, prices x U(0.85, 1.25)). Goals: < 1 s and gap <= 1% on
the bundled catalog, < 5 s on the 10x one.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from dataclasses import replace

os.environ.setdefault("SKYBROKER_HOME", tempfile.mkdtemp(prefix="skybroker-bench-"))

from skybroker.catalog import load_catalog
from skybroker.catalog.schema import Catalog
from skybroker.plan import make_plan
from skybroker.spec import load_spec

SPEC = """
name: world-chat
infra: skypilot
model: meta-llama/Llama-3.1-8B-Instruct
workload:
  rate: 60
  input_tokens: {mean: 600, p50: 400, p99: 3000}
  output_tokens: {mean: 250, p50: 180, p99: 800}
  users: {us-east: 0.25, us-west: 0.15, us-central: 0.1, eu-west: 0.15, eu-central: 0.1,
          asia-northeast: 0.1, asia-southeast: 0.1, oceania: 0.05}
slo: {ttft_ms: 1500, tpot_ms: 60, percentile: 99, max_rtt_ms: 60}
constraints: {spot: allowed, max_spot_share: 0.5, min_replicas: 4}
engine: {max_model_len: 8192}
"""


def synthetic_10x(cat: Catalog, seed: int = 0) -> Catalog:
    rng = random.Random(seed)
    offs, regions = [], dict(cat.regions)
    for k in range(10):
        shift = {
            key: (rng.uniform(-3, 3), rng.uniform(-3, 3), rng.uniform(0.85, 1.25))
            for key in cat.regions
        }
        for (cloud, region), r in cat.regions.items():
            dlat, dlon, _ = shift[cloud, region]
            name = region if k == 0 else f"{region}-s{k}"
            regions[cloud, name] = replace(
                r, region=name, lat=r.lat + dlat * (k > 0), lon=r.lon + dlon * (k > 0)
            )
        for o in cat.offerings:
            f = 1.0 if k == 0 else shift.get((o.cloud, o.region), (0, 0, 1.0))[2]
            name = o.region if k == 0 else f"{o.region}-s{k}"
            offs.append(replace(o, region=name,
                                price=o.price and round(o.price * f, 4),
                                spot_price=o.spot_price and round(o.spot_price * f, 4)))  # fmt: skip
    return Catalog(offs, cat.gpus, regions, cat.egress, ["synthetic 10x of the bundled catalog"])


def run(label: str, spec, cat: Catalog) -> None:
    t0 = time.perf_counter()
    plan = make_plan(spec, cat, baselines=False)
    wall = time.perf_counter() - t0
    s = plan.solver
    gap = "unknown" if s.gap is None else f"{s.gap:.3%}"
    print(f"{label:28s} plan {wall:6.2f} s (perf {s.perf_time_s:6.2f} s, ILP build {s.build_time_s:.2f} s, "
          f"solve {s.solve_time_s:.2f} s) {s.status} gap {gap}; offerings {s.num_offerings} -> "
          f"classes {s.num_classes} -> pruned {s.num_pruned}, {s.num_components} component(s); "
          f"${plan.cost_per_hour:.2f}/h, {sum(p.replicas for p in plan.placements)} instances")  # fmt: skip


def main() -> None:
    spec = load_spec(SPEC)
    cat = load_catalog()
    run("bundled catalog, cold", spec, cat)
    run("bundled catalog, warm", spec, cat)
    run("bundled catalog, warm", spec, cat)
    big = synthetic_10x(cat)
    run("10x synthetic catalog", spec, big)
    run("10x synthetic catalog", spec, big)


if __name__ == "__main__":
    main()
