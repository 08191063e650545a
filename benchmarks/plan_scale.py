"""Every bundled cloud example on a catalog 10x the bundled one: plan time, status and gap.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_scale.py

The 10x catalog is `plan_speed.synthetic_10x` (each region copied 9 times with jittered
location and prices x U(0.85, 1.25)). Each example is planned once to fill the perf cache
(capacities do not depend on the catalog's size), then timed warm, without baselines. Goal:
within 5 s, proven optimal or with the gap printed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("SKYBROKER_HOME", "/tmp/skybroker-bench")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from plan_speed import synthetic_10x

from skybroker.catalog import load_catalog
from skybroker.plan import make_plan
from skybroker.spec import load_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    big = synthetic_10x(load_catalog())
    print(f"10x catalog: {len(big.offerings)} offerings, {len(big.regions)} regions")
    for path in sorted(EXAMPLES.glob("*.yaml")):
        spec = load_spec(path)
        if spec.infra != "skypilot":
            continue
        make_plan(spec, big, baselines=False)  # perf cache
        t0 = time.perf_counter()
        plan = make_plan(spec, big, baselines=False)
        wall = time.perf_counter() - t0
        s = plan.solver
        gap = "unknown" if s.gap is None else f"{s.gap:.3%}"
        print(f"{path.stem}: {wall:.2f} s (solves {s.total_solve_time_s:.2f} s, the last MILP "
              f"{s.solve_time_s:.2f} s, perf+mix "
              f"{s.perf_time_s:.2f} s) {s.status}, gap {gap}, ${plan.cost_per_hour:.2f}/h; "
              f"classes {s.num_classes} -> {s.num_pruned} after pruning, "
              f"{getattr(plan, 'mix_rounds', 0)} mix re-solve(s)", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
