"""Benchmark: how long loading the whole bundled catalog takes, and what it holds.

    OMP_NUM_THREADS=1 python benchmarks/catalog_load.py [--runs 21]

Prints the median (and min) wall time of `load_catalog()` over the runs, the median time of
a bare `csv.reader` pass over the same four files measured in the same run (the floor any
CSV loader pays; the ratio is the cost of validation and record building), and the
catalog's row counts per cloud. The bar: under 200 ms.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from skybroker.catalog.loader import BUNDLED_DIR, load_catalog

FILES = ("offerings.csv", "gpus.csv", "regions.csv", "egress.csv")


def bare_csv() -> int:
    rows = 0
    for name in FILES:
        with (BUNDLED_DIR / name).open(newline="") as f:
            rows += sum(1 for _ in csv.reader(f))
    return rows


def timed(fn, runs: int) -> tuple[list[float], list[float]]:
    """Wall and CPU (process) milliseconds per run; CPU time is what a busy machine's
    other processes do not inflate."""
    wall, cpu = [], []
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1000)
        cpu.append((time.process_time() - c0) * 1000)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=21)
    args = parser.parse_args()
    load_catalog()  # warm the file cache and imports
    load_ms, load_cpu = timed(load_catalog, args.runs)
    csv_ms, csv_cpu = timed(bare_csv, args.runs)
    cat = load_catalog()
    med, floor = statistics.median(load_ms), statistics.median(csv_ms)
    cpu = statistics.median(load_cpu)
    print(f"load_catalog(): median {med:.1f} ms wall ({cpu:.1f} ms CPU), min {min(load_ms):.1f} ms "
          f"over {args.runs} runs (bar: < 200 ms) -> {'PASS' if med < 200 else 'FAIL'}")  # fmt: skip
    print(f"bare csv.reader over the same files: median {floor:.1f} ms wall "
          f"({statistics.median(csv_cpu):.1f} ms CPU); load/csv ratio {med / floor:.1f}x")  # fmt: skip
    per_cloud = Counter(o.cloud for o in cat.offerings)
    spot = Counter(o.cloud for o in cat.offerings if o.spot_price is not None)
    print(f"{len(cat.offerings)} offerings, {len({o.gpu for o in cat.offerings})} GPU kinds, "
          f"{len(cat.gpus)} GPU specs, {len(cat.regions)} regions, {len(cat.egress)} egress rows")  # fmt: skip
    for cloud, n in sorted(per_cloud.items()):
        kinds = sorted({o.gpu for o in cat.offerings if o.cloud == cloud})
        regions = len({o.region for o in cat.offerings if o.cloud == cloud})
        print(f"  {cloud:7s} {n:4d} offerings ({spot[cloud]:4d} with spot) in {regions:2d} regions: "
              f"{', '.join(kinds)}")  # fmt: skip


if __name__ == "__main__":
    main()
