"""What spreading spot over regions costs: each cloud example planned at `spot.spread` 1-3.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/plan_spread.py

`spot.spread: N` keeps every region at no more than 1/N of the spot traffic, so a region whose
spot market is reclaimed takes at most that share of it. For each bundled cloud example (the
chat example with `constraints.spot: allowed`, as benchmarks/autoscale.py plans it): the
plan's $/h, the spot share of its traffic and the largest share of spot traffic in one region,
at spread 1, 2 and 3, on the bundled catalog, without baselines.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import yaml

os.environ.setdefault("SKYBROKER_HOME", tempfile.mkdtemp(prefix="skybroker-spread-"))

from skybroker.plan import make_plan
from skybroker.spec import parse_spec

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def main() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if data.get("infra") != "skypilot":
            continue
        if data.get("constraints", {}).get("spot", "never") == "never":
            data["constraints"]["spot"] = "allowed"
        cells = []
        for n in (1, 2, 3):
            data["spot"] = {"spread": n}
            plan = make_plan(parse_spec(data, str(path)), baselines=False)
            total = sum(sum(p.serves.values()) for p in plan.placements)
            at: dict[str, float] = {}
            for p in plan.placements:
                if p.spot:
                    loc = f"{p.offering.cloud}/{p.offering.region}"
                    at[loc] = at.get(loc, 0.0) + sum(p.serves.values())
            spot = sum(at.values())
            most = max(at.values()) / spot if spot else 0.0
            cells.append(f"spread {n}: ${plan.cost_per_hour:.2f}/h, spot {spot / total:.0%} in "
                         f"{len(at)} region(s), at most {most:.0%} in one")  # fmt: skip
        print(f"{path.stem}: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
