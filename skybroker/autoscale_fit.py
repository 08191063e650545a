"""What a placement serves under the spec's constraints, for the autoscaler's steps.

A plan places replicas so that every user region is served from locations within the SLO's
RTT and no more than `max_spot_share` of the rate runs on spot, `max_region_share` in one
region, `max_cloud_share` on one cloud, and no location holds more than 1/`spot.spread` of
the spot traffic. Adding or removing single replicas (the autoscaler's steps) must keep
that true, so their capacity is not the sum of the replicas': `Fit.servable` is the highest
rate (users in the spec's shares) a placement serves under those constraints, and
`Fit.shortfall` the demand it leaves unserved at a given rate (0: the placement is feasible
for it). Both are small LPs (users x targets flows) solved with HiGHS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from skybroker.milp import Lp, run_highs

Targets = list[dict[str, Any]]


def location(t: dict[str, Any]) -> str:
    cloud, region, _, _ = t["key"]
    return f"{cloud}/{region}"


@dataclass(frozen=True)
class Fit:
    """The spec's users and shares. A location `reach` does not name reaches every user."""

    users: dict[str, float]  # user region -> its share of the rate
    reach: dict[str, frozenset[str]] = field(default_factory=dict)  # location -> users
    max_spot_share: float = 1.0
    max_region_share: float = 1.0
    max_cloud_share: float = 1.0
    spot_spread: int = 1

    @classmethod
    def from_spec(cls, spec: Any, catalog: Any = None) -> Fit:
        """The users, their reach (every location the constraints allow) and the shares."""
        c = spec.constraints
        users = dict(spec.workload.user_shares())
        shares = {"max_spot_share": c.spot_share_limit(), "max_region_share": c.max_region_share,
                  "max_cloud_share": c.max_cloud_share,
                  "spot_spread": spec.spot.spread if spec.spot else 1}  # fmt: skip
        if spec.infra == "local":
            return cls(users, {}, **shares)
        from skybroker.plan_problem import allowed_offerings, user_reach

        if catalog is None:
            from skybroker.catalog import load_catalog

            catalog = load_catalog()
        locs = {
            f"{o.cloud}/{o.region}" for o, _, _ in allowed_offerings(spec, catalog, frozenset())
        }
        by_user = user_reach(spec, catalog, locs)
        reach = {loc: frozenset(u for u, near in by_user.items() if loc in near) for loc in locs}
        return cls(users, reach, **shares)

    def reaches(self, t: dict[str, Any]) -> frozenset[str]:
        return self.reach.get(location(t), frozenset(self.users))

    def _plain(self, targets: Targets) -> bool:
        """No constraint binds anything: every target reaches every user, no share caps."""
        caps = (self.max_spot_share, self.max_region_share, self.max_cloud_share)
        return (
            all(s >= 1 for s in caps)
            and self.spot_spread <= 1
            and all(self.reaches(t) >= self.users.keys() for t in targets)
        )

    def servable(self, targets: Targets) -> float:
        """The highest rate (req/s, users in their shares) `targets` serve within their
        planned capacities and the constraints."""
        live = [t for t in targets if t["replicas"] > 0]
        if self._plain(live):
            return sum(t["replicas"] * t["capacity_rps"] for t in live)
        lp, flows = self._flows(live)
        rate = lp.col(0, math.inf, -1.0)
        for u, share in self.users.items():
            lp.row(0, 0, [*((c, 1.0) for c in flows[u].values()), (rate, -share)])
        self._shares(lp, live, flows, [(rate, 1.0)])
        r = run_highs(lp, 5.0, 1e-9)
        return max(0.0, -r.cost) if r.status == "optimal" else 0.0

    def shortfall(self, targets: Targets, rate: float) -> float:
        """The req/s of `rate` (users in their shares) that `targets` leave unserved at
        best (0: they serve it within their capacities and the constraints)."""
        live = [t for t in targets if t["replicas"] > 0]
        if self._plain(live):
            return max(0.0, rate - sum(t["replicas"] * t["capacity_rps"] for t in live))
        lp, flows = self._flows(live)
        for u, share in self.users.items():
            unmet = lp.col(0, math.inf, 1.0)
            lp.row(
                rate * share, rate * share, [*((c, 1.0) for c in flows[u].values()), (unmet, 1.0)]
            )
        self._shares(lp, live, flows, [], rate)
        r = run_highs(lp, 5.0, 1e-9)
        return max(0.0, r.cost) if r.status == "optimal" else rate

    def _flows(self, live: Targets) -> tuple[Lp, dict[str, dict[int, int]]]:
        """Flow columns user -> target (where it reaches), each target within its capacity."""
        lp = Lp()
        flows: dict[str, dict[int, int]] = {u: {} for u in self.users}
        for j, t in enumerate(live):
            for u in self.reaches(t) & self.users.keys():
                flows[u][j] = lp.col(0, math.inf)
            cols = [(flows[u][j], 1.0) for u in self.users if j in flows[u]]
            lp.row(-math.inf, t["replicas"] * t["capacity_rps"], cols)
        return lp, flows

    def _shares(self, lp: Lp, live: Targets, flows: dict[str, dict[int, int]],
                rate_terms: list[tuple[int, float]], rate: float = 0.0) -> None:  # fmt: skip
        """Spot, region and cloud shares of the rate: of the `rate` column (`rate_terms`)
        when it is a variable, of `rate` when it is fixed; and the spot spread."""
        groups: list[tuple[float, set[int]]] = []
        if self.max_spot_share < 1:
            groups.append((self.max_spot_share, {j for j, t in enumerate(live) if t["key"][3]}))
        for share, part in ((self.max_region_share, location), (self.max_cloud_share,
                                                                  lambda t: t["key"][0])):  # fmt: skip
            if share < 1:
                for g in {part(t) for t in live}:
                    groups.append((share, {j for j, t in enumerate(live) if part(t) == g}))
        for share, members in groups:
            cols = [(c, 1.0) for per in flows.values() for j, c in per.items() if j in members]
            if rate_terms:
                lp.row(-math.inf, 0, cols + [(c, -share * v) for c, v in rate_terms])
            else:
                lp.row(-math.inf, share * rate, cols)
        if self.spot_spread > 1:  # each location's spot flow <= 1/N of all spot flow
            spot = [(c, location(live[j])) for per in flows.values() for j, c in per.items()
                    if live[j]["key"][3]]  # fmt: skip
            for loc in sorted({at for _, at in spot}):
                lp.row(-math.inf, 0, [(c, (at == loc) - 1 / self.spot_spread) for c, at in spot])
