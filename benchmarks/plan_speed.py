"""Plan time on the full bundled catalog and on a 10x larger synthetic one.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_speed.py [--repeat 5] [--quick]

A world-wide 8B chat spec (users in 8 areas, RTT <= 60 ms, at most half the traffic on spot,
min 4 replicas). Capacities are the planner's own (perf model: roofline + scheduler
simulation), computed once and kept in the disk cache under $SKYBROKER_HOME (default
/tmp/skybroker-bench, so a second run starts warm). For each catalog it prints:
- the end-to-end `make_plan` time (perf from the cache, no baselines);
- the optimizer alone on the same Problem, median of --repeat runs, wall and CPU seconds:
  offering classes before/after each reduction, MILP columns/rows, prune/build/solve time,
  status and gap; first with every technique on, then with each one switched off
  (`--quick` skips those) so what each buys is measured in the same run. Through pulp the
  model is handed over inside "solve" time.
The 10x catalog: 10 synthetic copies of every region (jittered location, prices
x U(0.85, 1.25)). Goals: < 1 s and gap <= 1% on the bundled catalog, < 5 s on the 10x one.
The machine's load inflates wall time; CPU time is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("SKYBROKER_HOME", "/tmp/skybroker-bench")

from skybroker import plan as planner
from skybroker.catalog import load_catalog
from skybroker.catalog.schema import Catalog
from skybroker.optimizer import Options, Problem, solve
from skybroker.perf.capacity import flush_disk_cache, prefetch_disk_cache
from skybroker.perf.workload import request_classes, workload_samples
from skybroker.spec import DeploymentSpec, load_spec

SPEC = Path(__file__).resolve().parents[1] / "examples" / "world-chat.yaml"

VARIANTS = {
    "all on": Options(),
    "no tightening rows": Options(tighten=False),
    "no k-copy/saturation": Options(multi_copy=False),
    "rounded-LP start only": Options(support_mip=False),
    "no warm start": Options(warm_start=False),
    "via pulp, no warm start": Options(backend="pulp"),
}


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


def build(spec: DeploymentSpec, cat: Catalog) -> tuple[Problem, int, float]:
    """The Problem `make_plan` solves (same steps), the allowed offering rows, perf seconds."""
    from skybroker import plan_perf, plan_problem

    t0 = time.perf_counter()
    arch = plan_perf.resolve_arch(spec.model, spec.infra)
    ins, outs = workload_samples(spec.workload)
    classes = request_classes(ins, outs)
    need_len = plan_perf.required_len(spec, arch, classes)
    prefetch_disk_cache()
    rows = plan_problem.allowed_offerings(spec, cat, frozenset())
    perf = plan_perf.perf_per_config(arch, spec, cat, classes, rows, need_len)
    flush_disk_cache()
    problem, _ = plan_problem.build_problem(spec, cat, classes, rows, perf)
    return problem, len(rows), time.perf_counter() - t0


def end_to_end(label: str, spec: DeploymentSpec, cat: Catalog) -> None:
    t0 = time.perf_counter()
    plan = planner.make_plan(spec, cat, baselines=False)
    wall = time.perf_counter() - t0
    s = plan.solver
    gap = "unknown" if s.gap is None else f"{s.gap:.3%}"
    print(f"{label}: make_plan {wall:.2f} s (perf {s.perf_time_s:.2f} s, optimizer "
          f"{s.build_time_s + s.solve_time_s:.2f} s) {s.status} gap {gap}; "
          f"${plan.cost_per_hour:.4f}/h, {sum(p.replicas for p in plan.placements)} instances")  # fmt: skip


def optimizer_only(label: str, p: Problem, rows: int, repeat: int, variants: dict) -> None:
    print(f"{label}: optimizer alone, median of {repeat} runs (allowed offering rows {rows}, "
          f"offering classes {len(p.offerings)}, {len(p.demand)} user areas, "
          f"{p.num_classes} request classes)")  # fmt: skip
    for name, opts in variants.items():
        runs = []
        for _ in range(repeat):
            c0, t0 = time.process_time(), time.perf_counter()
            s = solve(p, options=opts)
            runs.append((time.perf_counter() - t0, time.process_time() - c0, s))
        wall, worst = statistics.median(r[0] for r in runs), max(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        s = runs[-1][2]
        r = s.reduction
        med = {k: statistics.median(getattr(x[2], k) for x in runs)
               for k in ("prune_time_s", "build_time_s", "solve_time_s")}  # fmt: skip
        gap = "unknown" if s.gap is None else f"{s.gap:.4%}"
        print(f"  {name:22s} wall {wall:5.2f} s (max {worst:5.2f}) cpu {cpu:5.2f} s | classes {r.useful} useful -> "
              f"{r.aggregated} aggregated -> {r.dominated} undominated -> {r.multi_copy} "
              f"k-copy | {s.num_vars} cols {s.num_rows} rows, {s.num_components} component(s)"
              f" | prune {med['prune_time_s']:.2f} build {med['build_time_s'] - med['prune_time_s']:.2f}"
              f" solve {med['solve_time_s']:.2f} s | {s.status} gap {gap} "
              f"${s.cost:.4f}/h [{s.solver}]", flush=True)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5, help="runs per optimizer figure")
    ap.add_argument("--quick", action="store_true", help="only the all-on optimizer runs")
    args = ap.parse_args()
    variants = {"all on": VARIANTS["all on"]} if args.quick else VARIANTS
    spec = load_spec(SPEC)
    cat = load_catalog()
    for label, c in (("bundled catalog", cat), ("10x synthetic catalog", synthetic_10x(cat))):
        p, rows, perf_s = build(spec, c)
        print(f"{label}: perf model {perf_s:.1f} s (0 when the disk cache is warm)")
        end_to_end(label, spec, c)
        optimizer_only(label, p, rows, args.repeat, variants)


if __name__ == "__main__":
    main()
