"""What headroom costs, and how far the linear capacity rule is from simulated mixes.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_margin.py

For every bundled example: the plan's $/h with `slo.margin` 0, 0.1, 0.2 and auto (0.17 on a
measured profile, 0.25 on the roofline), and, at auto, per placement the linear rule's error
against a simulation of the mix that placement serves ((linear - simulated) / simulated;
> 0: the rule overstates the capacity), the ILP re-solves that correcting it took, and the
slowdown each placement absorbs at its load.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("SKYBROKER_HOME", tempfile.mkdtemp(prefix="skybroker-margin-"))

from skybroker.plan import InfeasibleError, make_plan
from skybroker.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        costs, plan = [], None
        for m in (0, 0.1, 0.2, "auto"):
            data.setdefault("slo", {})["margin"] = m
            try:
                plan = make_plan(parse_spec(data, str(path)), baselines=False)
                costs.append(f"margin {m}: ${plan.cost_per_hour:.2f}/h")
            except InfeasibleError as e:
                plan = None  # the lines below describe the plan at auto only
                costs.append(f"margin {m}: infeasible ({str(e)[:60]}...)")
        print(f"{path.stem}: " + " | ".join(costs), flush=True)
        if plan is None:
            continue
        errs = [f"{p.offering.instance_type} TP{p.tensor_parallel}: rule {p.mix_rule_error:+.1%}, "
                f"absorbs {p.headroom:.0%}" for p in plan.placements
                if p.mix_rule_error is not None and p.headroom is not None]  # fmt: skip
        print(f"    auto: {plan.mix_rounds} re-solve(s); " + "; ".join(errs), flush=True)


if __name__ == "__main__":
    main()
