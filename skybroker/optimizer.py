"""The placement integer program: how many replicas of which offering, serving whom.

Flow formulation (see docs in README "Planner"):

    n[o]      integer replicas of offering class o (cloud, region, instance type, market)
    y[o,b]    req/s of request-size class b served on o             (continuous)
    x[u,l,b]  req/s of class b from user region u served at location l, only where
              RTT(u, l) <= the SLO's limit                          (continuous)

    min   sum_o price[o] n[o] + sum_{o,b} egress[o,b] y[o,b]
    s.t.  sum_l x[u,l,b] = demand[u,b]                 every user region's demand is served
          sum_{o at l} y[o,b] = sum_u x[u,l,b]         flow balance per location and class
          sum_b y[o,b] / mu[o,b] <= n[o]               capacity (mu: one replica's max rate
                                                       of class b alone within the SLO)
          spot, per-region and per-cloud shares of the traffic, min replicas, budget.

Before building it: offerings that cannot serve anything or reach no user are dropped, and
dominated ones too (another offering in the same market/cloud/region group, as the active
constraints require, reaches a superset of users, has at least the capacity for every class
and costs no more). The problem splits into independent geographic components when the RTT
limit disconnects them and no constraint couples them. HiGHS (through highspy, via pulp)
solves each; its own status, dual bound and gap are read back (pulp says "Optimal" even when
a time limit stopped the solver). CBC is the fallback when highspy is missing.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class OfferingClass:
    """Offerings the optimizer treats as one: same location, market and capacity."""

    key: tuple  # the representative offering's key (cloud, region, instance_type, spot)
    cloud: str
    location: str  # serving location, e.g. "aws/us-east-1"
    price: float  # $/h per replica
    spot: bool
    mu: tuple[float, ...]  # max req/s per replica for each request class (0: cannot serve)
    egress: tuple[float, ...] = ()  # $/h per (req/s) of each class served here
    max_count: int | None = None  # at most this many replicas (e.g. the one local machine)


@dataclass(slots=True)
class Problem:
    offerings: list[OfferingClass]
    demand: dict[str, tuple[float, ...]]  # user region -> req/s per request class
    reach: dict[str, frozenset[str]]  # user region -> locations within the RTT limit
    min_replicas: int = 0
    max_spot_share: float = 1.0
    max_region_share: float = 1.0
    max_cloud_share: float = 1.0
    budget: float | None = None

    @property
    def num_classes(self) -> int:
        return len(next(iter(self.demand.values())))

    @property
    def total_demand(self) -> float:
        return float(sum(sum(d) for d in self.demand.values()))


@dataclass(slots=True)
class Solution:
    status: str  # "optimal" | "feasible" (stopped at a limit, gap > tolerance) | "infeasible"
    counts: dict[int, int] = field(default_factory=dict)  # offering index -> replicas
    rates: dict[tuple[int, int], float] = field(default_factory=dict)  # (o, b) -> req/s
    flows: dict[tuple[str, str, int], float] = field(default_factory=dict)  # (u, l, b) -> req/s
    cost: float = math.inf  # objective: $/h of replicas + egress
    bound: float = math.inf  # the solver's best dual bound
    gap: float | None = None  # (cost - bound) / cost; None where the solver does not say
    solve_time_s: float = 0.0
    build_time_s: float = 0.0
    solver: str = ""
    num_offerings: int = 0  # after pruning
    num_components: int = 0

    @property
    def hourly(self) -> float:
        return self.cost


# --- pruning ------------------------------------------------------------------------------


def _reach_matrix(p: Problem, users: list[str]) -> np.ndarray:
    return np.array([[o.location in p.reach[u] for u in users] for o in p.offerings], dtype=bool)


def prune(p: Problem) -> list[int]:
    """Indices of offerings that remain after dropping useless and dominated ones."""
    users = list(p.demand)
    demand = np.array([p.demand[u] for u in users])  # U x B
    reach = _reach_matrix(p, users)
    mu = np.array([o.mu for o in p.offerings]).reshape(len(p.offerings), -1)
    nb = mu.shape[1]
    egress = np.array([o.egress or (0.0,) * nb for o in p.offerings]).reshape(len(p.offerings), nb)
    # useful: reaches a user with demand in a class it can serve
    useful = ((reach.astype(float) @ demand) * (mu > 0)).sum(1) > 0
    groups: dict[tuple, list[int]] = {}
    for i, o in enumerate(p.offerings):
        if not useful[i]:
            continue
        g = (
            o.spot if p.max_spot_share < 1 else None,
            o.cloud if p.max_cloud_share < 1 else None,
            o.location if p.max_region_share < 1 else None,
        )
        groups.setdefault(g, []).append(i)
    keep: list[int] = []
    for idx in groups.values():
        ix = np.array(idx)
        price = np.array([p.offerings[i].price for i in idx])
        order = np.lexsort((ix, price))  # cheapest first; ties by index
        ix, price = ix[order], price[order]
        # features where "more is better": capacity, -egress, reach; b dominates a when b comes
        # earlier (cheaper, or as cheap with a lower index) and is >= on all of them.
        # Dominance is transitive, so comparing against survivors only is exact.
        feat = np.hstack([mu[ix], -egress[ix], reach[ix].astype(float)])
        alive = np.zeros(len(ix), dtype=bool)
        for c0 in range(0, len(ix), 256):
            chunk = feat[c0 : c0 + 256]
            surv = feat[alive]
            dom = np.zeros(len(chunk), dtype=bool)
            if len(surv):
                dom |= (surv[None, :, :] >= chunk[:, None, :]).all(2).any(1)
            within = (chunk[None, :, :] >= chunk[:, None, :]).all(2)  # [a, b]: b >= a
            dom |= np.tril(within, -1).any(1)
            alive[c0 : c0 + len(chunk)] = ~dom
        keep.extend(int(i) for i in ix[alive])
    return sorted(keep)


def components(p: Problem, idx: list[int]) -> list[tuple[list[str], list[int]]]:
    """(users, offering indices) of each connected user-location component."""
    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    locs = {p.offerings[i].location for i in idx}
    for u in p.demand:
        find("u:" + u)
        for loc in p.reach[u] & locs:
            parent[find("u:" + u)] = find("l:" + loc)
    comps: dict[str, tuple[list[str], list[int]]] = {}
    for u in p.demand:
        comps.setdefault(find("u:" + u), ([], []))[0].append(u)
    for i in idx:
        root = find("l:" + p.offerings[i].location)
        if root in comps:
            comps[root][1].append(i)
    return list(comps.values())


def _coupled(p: Problem, comps: list) -> bool:
    """Whether a constraint ties components together (then they are solved as one)."""
    if p.max_cloud_share < 1 or p.budget is not None:  # budget caps price, not price + egress
        return True
    if p.max_spot_share < 1 and any(o.spot for o in p.offerings):
        return True
    served = sum(1 for users, _ in comps if any(sum(p.demand[u]) > 0 for u in users))
    return p.min_replicas > served


# --- the integer program ------------------------------------------------------------------


_banner_silenced = False


def _silence_highs_banner() -> None:
    """HiGHS prints a banner to fd 1 when the first Highs() of a process is made; make that
    one with stdout pointed at /dev/null so `--json` output stays clean."""
    global _banner_silenced
    if _banner_silenced:
        return
    _banner_silenced = True
    try:
        import highspy
    except ImportError:
        return
    import ctypes

    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
        ctypes.CDLL(None).fflush(None)  # the banner sits in C stdio's buffer until flushed
    finally:
        os.dup2(saved, 1)
        os.close(devnull)
        os.close(saved)


def _solver(name: str, time_limit: float, gap_rel: float) -> Any:
    import pulp

    _silence_highs_banner()

    if name == "highs" and pulp.HiGHS().available():
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=1)
    return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel)


def _solve_component(p: Problem, users: list[str], idx: list[int], total: float,
                     time_limit: float, gap_rel: float, solver: str) -> Solution:  # fmt: skip
    import pulp

    t0 = time.perf_counter()
    nb = p.num_classes
    offs = {i: p.offerings[i] for i in idx}
    dem = {u: p.demand[u] for u in users}
    reach_dem = {i: [sum(dem[u][b] for u in users if o.location in p.reach[u]) for b in range(nb)]
                 for i, o in offs.items()}  # fmt: skip
    lp = pulp.LpProblem("placement", pulp.LpMinimize)
    n, y = {}, {}
    for i, o in offs.items():
        ub = sum(math.ceil(reach_dem[i][b] / o.mu[b] - 1e-9) for b in range(nb) if o.mu[b] > 0)
        if p.budget is not None:
            ub = min(ub, int(p.budget // o.price) if o.price > 0 else ub)
        ub = max(ub, p.min_replicas)
        if o.max_count is not None:
            ub = min(ub, o.max_count)
        n[i] = pulp.LpVariable(f"n_{i}", 0, ub, cat="Integer")
        for b in range(nb):
            if o.mu[b] > 0 and reach_dem[i][b] > 0:
                y[i, b] = pulp.LpVariable(f"y_{i}_{b}", 0, reach_dem[i][b])
    locs: dict[str, list[int]] = {}
    for i, o in offs.items():
        locs.setdefault(o.location, []).append(i)
    x = {}
    x_at: dict[tuple[str, int], list] = {}
    for u in users:
        for b in range(nb):
            if dem[u][b] <= 0:
                continue
            terms = []
            for loc in p.reach[u]:
                if any((i, b) in y for i in locs.get(loc, ())):
                    x[u, loc, b] = v = pulp.LpVariable(f"x_{len(x)}", 0, dem[u][b])
                    x_at.setdefault((loc, b), []).append(v)
                    terms.append(v)
            if not terms:
                return Solution("infeasible", build_time_s=time.perf_counter() - t0)
            lp += pulp.lpSum(terms) == dem[u][b], f"demand_{len(lp.constraints)}"
    for loc, members in locs.items():
        for b in range(nb):
            ys = [y[i, b] for i in members if (i, b) in y]
            xs = x_at.get((loc, b), [])
            if ys or xs:
                lp += pulp.lpSum(ys) == pulp.lpSum(xs), f"flow_{len(lp.constraints)}"
        if p.max_region_share < 1:
            mset = set(members)
            lp += (
                pulp.lpSum(v for (i, _), v in y.items() if i in mset) <= p.max_region_share * total
            )
    for i, o in offs.items():
        lp += pulp.lpSum((1.0 / o.mu[b]) * y[i, b] for b in range(nb) if (i, b) in y) <= n[i]
    if p.max_spot_share < 1:
        lp += pulp.lpSum(v for (i, _), v in y.items() if offs[i].spot) <= p.max_spot_share * total
    if p.max_cloud_share < 1:
        for cloud in {o.cloud for o in offs.values()}:
            lp += (
                pulp.lpSum(v for (i, _), v in y.items() if offs[i].cloud == cloud)
                <= p.max_cloud_share * total
            )
    if p.min_replicas:
        lp += pulp.lpSum(n.values()) >= p.min_replicas
    if p.budget is not None:
        lp += pulp.lpSum(o.price * n[i] for i, o in offs.items()) <= p.budget
    lp += pulp.lpSum(o.price * n[i] for i, o in offs.items()) + pulp.lpSum(
        offs[i].egress[b] * v for (i, b), v in y.items() if offs[i].egress
    )
    build = time.perf_counter() - t0
    s = _solver(solver, time_limit, gap_rel)
    t1 = time.perf_counter()
    lp.solve(s)
    solve = time.perf_counter() - t1
    sol = Solution("infeasible", build_time_s=build, solve_time_s=solve, solver=s.name)
    status, gap, bound = _read_status(lp, s)
    if status == "infeasible":
        return sol
    sol.status, sol.gap, sol.bound = status, gap, bound
    sol.cost = float(pulp.value(lp.objective) or 0.0)
    sol.counts = {i: round(v.value() or 0) for i, v in n.items() if (v.value() or 0) > 0.5}
    sol.rates = {k: v.value() for k, v in y.items() if (v.value() or 0) > 1e-9}
    sol.flows = {k: v.value() for k, v in x.items() if (v.value() or 0) > 1e-9}
    return sol


def _read_status(lp: Any, s: Any) -> tuple[str, float | None, float]:
    """The solver's own verdict: (optimal | feasible | infeasible, gap, dual bound)."""
    import pulp

    model = getattr(lp, "solverModel", None)
    if s.name == "HiGHS" and model is not None:
        info = model.getInfo()
        text = model.modelStatusToString(model.getModelStatus()).lower()
        if info.primal_solution_status == 0 or "infeasible" in text:
            return "infeasible", None, math.inf
        gap = max(float(info.mip_gap), 0.0) if math.isfinite(info.mip_gap) else None
        return ("optimal" if text == "optimal" else "feasible"), gap, float(info.mip_dual_bound)
    if lp.status != pulp.LpStatusOptimal:
        return "infeasible", None, math.inf
    return "feasible", None, -math.inf  # CBC through pulp hides its bound: gap unknown


def solve(p: Problem, *, time_limit: float = 20.0, gap_rel: float = 1e-4,
          solver: str = "highs", split: bool = True) -> Solution:  # fmt: skip
    """Cheapest placement of `p`; `status == "infeasible"` when there is none."""
    t0 = time.perf_counter()
    idx = prune(p)
    prune_s = time.perf_counter() - t0
    comps = components(p, idx)
    total = p.total_demand
    if not split or len(comps) <= 1 or _coupled(p, comps):
        users = list(p.demand)
        comps = [(users, idx)]
    out = Solution(
        "optimal", num_offerings=len(idx), num_components=len(comps), cost=0.0, bound=0.0
    )
    out.build_time_s = prune_s
    for users, members in comps:
        if not any(sum(p.demand[u]) > 0 for u in users):
            continue
        sub = _solve_component(p, users, members, total, time_limit, gap_rel, solver)
        out.build_time_s += sub.build_time_s
        out.solve_time_s += sub.solve_time_s
        out.solver = sub.solver
        if sub.status == "infeasible":
            out.status, out.cost, out.counts = "infeasible", math.inf, {}
            return out
        if sub.status == "feasible":
            out.status = "feasible"
        out.cost += sub.cost
        out.bound += sub.bound
        out.counts.update(sub.counts)
        out.rates.update(sub.rates)
        out.flows.update(sub.flows)
    if p.budget is not None and out.cost - _egress(p, out) > p.budget + 1e-6:
        out.status, out.cost = "infeasible", math.inf
        return out
    if math.isfinite(out.bound) and out.cost > 0:
        out.gap = max(0.0, (out.cost - out.bound) / out.cost)
    elif out.bound == -math.inf:
        out.gap = None
    else:
        out.gap = 0.0
    return out


def _egress(p: Problem, s: Solution) -> float:
    return sum(
        p.offerings[i].egress[b] * v for (i, b), v in s.rates.items() if p.offerings[i].egress
    )
