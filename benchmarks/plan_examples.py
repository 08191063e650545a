"""Plan cost and time of every bundled example (examples/*.yaml), cold and warm perf cache.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_examples.py [--json OUT]

Each example is planned twice with a fresh $SKYBROKER_HOME: cold (every capacity search
runs) and warm (searches from the disk cache). Printed per example: $/h, the placements
(count x instance, TP x replicas per instance; the linear capacity rule's error on the mix
each serves, (linear - simulated) / simulated, and the 95% CI half-width of its predicted
latency), the mix re-solves, the baselines, and the plan times. Run it
with PYTHONPATH pointing at another tree to compare two versions of the planner on the
same machine (the figures in the docs come from interleaved runs of both).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _tails(p: dict) -> str:
    """The linear rule's error on the placement's mix and its latency CI (where known)."""
    bits = []
    if p.get("mix_rule_error") is not None:
        bits.append(f"linear rule {p['mix_rule_error']:+.1%}")
    if p.get("latency_ci") is not None:
        bits.append(f"latency CI +-{p['latency_ci']:.1%}")
    return f": {', '.join(bits)}" if bits else ""


def plan_once(path: Path) -> dict:
    from skybroker.plan import make_plan
    from skybroker.spec import load_spec

    t0 = time.perf_counter()
    plan = make_plan(load_spec(path))
    wall = time.perf_counter() - t0
    d = plan.to_dict()
    return {
        "cost_per_hour": d["cost_per_hour"],
        "wall_s": round(wall, 2),
        "perf_s": round(plan.solver.perf_time_s, 2),
        "solve_s": round(plan.solver.solve_time_s, 3),
        "placements": [
            f"{p['replicas']} x {p['cloud']}/{p['region']} {p['instance_type']}"
            f"{' spot' if p['spot'] else ''} (TP{p['tensor_parallel']} x{p['data_parallel']})"
            + _tails(p)
            for p in d["placements"]
        ],
        "mix_rounds": d.get("mix_rounds"),
        "mix_confirmed": d.get("mix_confirmed"),
        "baselines": d["baselines"],
        "baseline_notes": d["baseline_notes"],
        "margin": d.get("margin"),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the figures here too")
    ap.add_argument("--only", help="only the example whose file name contains this")
    args = ap.parse_args()
    from skybroker.plan import InfeasibleError

    out: dict[str, dict] = {}
    home = tempfile.mkdtemp(prefix="skybroker-examples-")
    os.environ["SKYBROKER_HOME"] = home
    for path in sorted(EXAMPLES.glob("*.yaml")):
        if args.only and args.only not in path.name:
            continue
        try:
            cold = plan_once(path)
        except InfeasibleError as e:  # e.g. the local example on a machine too slow for it
            out[path.stem] = {"infeasible": str(e)}
            print(f"{path.stem}: infeasible: {e}", flush=True)
            continue
        warm = plan_once(path)
        out[path.stem] = {"cold": cold, "warm_wall_s": warm["wall_s"]}
        print(f"{path.stem}: ${cold['cost_per_hour']:.2f}/h  cold {cold['wall_s']:.1f} s "
              f"(perf {cold['perf_s']:.1f} s)  warm {warm['wall_s']:.2f} s; "
              f"{cold['mix_rounds']} mix re-solve(s), confirmed {cold['mix_confirmed']}",
              flush=True)  # fmt: skip
        for p in cold["placements"]:
            print(f"    {p}")
        for name, cost in cold["baselines"].items():
            note = cold["baseline_notes"].get(name, "")
            print(f"    baseline {name}: {cost if cost is None else round(cost, 2)} ({note})")
    print(f"(skybroker from {sys.modules['skybroker'].__file__})")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
