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
          spot, per-region and per-cloud shares of the traffic, min replicas, budget
          (on the objective: instances and egress), spot spread N (per location l:
          sum_{spot o at l, b} y[o,b] <= sum_{spot o, b} y[o,b] / N).

A re-plan's warm start (`Problem.running`, `launch_cost`) adds the switching cost: every
replica is priced with its launch, keep[o] <= min(n[o], running[o]) replicas get it back
(min ... + sum_o launch[o] (n[o] - keep[o])), so what runs is kept unless a change pays.

Before building it (`skybroker.prune`): offerings that cannot serve anything or reach no
user are dropped; interchangeable ones are aggregated onto the cheapest; an offering is
dropped when k copies of another one in its constraint group (market/cloud/region, as the
active share constraints require) reach a superset of its users, carry whatever it could and
cost no more (k = 1: plain dominance; an offering that can take all the demand it can ever
be given, within reach and shares, with one replica counts as unlimited). Under a region
share, an offering dominated at more other locations than an optimal placement can have
replicas is dropped too (the bound from a heuristic placement's cost). Users that reach
the same locations share flow variables. The model (`skybroker.optimizer_model.build_milp`)
adds valid inequalities that tighten the LP relaxation without cutting off integer points:
capacity from the most work an offering can get (its reach and shares), per-class and
per-replica rate linking, replica covers per user, per geographic group and for the
on-demand share. The problem splits into independent geographic components when no
constraint couples them. HiGHS solves each through highspy (arrays, no modelling layer),
warm-started from the optimum of the same MILP restricted to the offerings its LP relaxation
uses (an integral relaxation is the answer outright); its own status, dual bound and gap are
read back (the backends: `skybroker.milp`). pulp builds the same model for CBC, the fallback
when highspy is missing (pulp says "Optimal" even when a time limit stopped the solver, and
hides CBC's bound: the gap is then unknown).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from skybroker.milp import Lp, Result, has_highspy, run_highs, run_pulp
from skybroker.optimizer_model import build_milp, components
from skybroker.prune import (
    Features,
    Reduction,
    far_dominators,
    far_prune,
    features,
    prune,
)


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
    budget: float | None = None  # $/h of the whole plan: instances and egress
    # spot traffic over at least this many locations: none holds more than 1/N of it
    spot_spread: int = 1
    # A re-plan's warm start: replicas already running per offering class, and what starting
    # one more replica of each class costs on the objective ($/h; empty: nothing). Keeping a
    # running replica costs its price; a new one its price plus its launch cost.
    running: dict[int, int] = field(default_factory=dict)
    launch_cost: tuple[float, ...] = ()

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
    cost: float = math.inf  # objective: $/h of replicas + egress (+ launches, see below)
    launch_cost: float = 0.0  # of `cost`: the launch costs of the replicas not running yet
    bound: float = math.inf  # the solver's best dual bound
    gap: float | None = None  # (cost - bound) / cost; None where the solver does not say
    solve_time_s: float = 0.0
    build_time_s: float = 0.0
    solver: str = ""
    num_offerings: int = 0  # after pruning
    num_components: int = 0
    num_vars: int = 0  # columns of the MILP(s) solved
    num_rows: int = 0
    prune_time_s: float = 0.0  # included in build_time_s
    reduction: Reduction | None = None

    @property
    def hourly(self) -> float:
        return self.cost


def _solve_component(p: Problem, users: list[str], idx: list[int], total: float,
                     opts: Options) -> Solution:  # fmt: skip
    t0 = time.perf_counter()
    built = build_milp(p, users, idx, total, opts.tighten)
    if built is None:
        return Solution("infeasible", build_time_s=time.perf_counter() - t0)
    lp, v = built
    build = time.perf_counter() - t0
    t1 = time.perf_counter()
    relax = opts.relaxation and has_highspy()
    if relax:  # a lower bound: the LP relaxation, replica counts rounded up
        r, name = run_highs(replace(lp, integer=[]), opts.time_limit, 1.0), "HiGHS (LP)"
        r.gap = None
    elif opts.backend == "highspy" and opts.solver == "highs" and has_highspy():
        start, r = _warm_start(lp, opts) if opts.warm_start else (None, None)
        left = max(opts.time_limit - (time.perf_counter() - t1), 0.1)
        r, name = r or run_highs(lp, left, opts.gap_rel, start, opts.node_limit), "HiGHS"
    else:
        r = run_pulp(lp, opts.solver, opts.time_limit, opts.gap_rel)
        name = "HiGHS (pulp)" if opts.solver == "highs" and has_highspy() else "CBC (pulp)"
    sol = Solution("infeasible", build_time_s=build, solve_time_s=time.perf_counter() - t1,
                   solver=name, num_vars=len(lp.lb), num_rows=lp.num_rows)  # fmt: skip
    if r.status == "infeasible":
        return sol
    sol.status, sol.gap, sol.bound, sol.cost = r.status, r.gap, r.bound, r.cost
    val = r.values
    if relax:
        sol.counts = {i: math.ceil(val[c] - 1e-6) for i, c in v.n.items() if val[c] > 1e-6}
    else:
        sol.counts = {i: round(val[c]) for i, c in v.n.items() if val[c] > 0.5}
    sol.rates = {k: val[c] for k, c in v.y.items() if val[c] > 1e-9}
    for (g, loc, b), c in v.x.items():
        group = v.split[g]
        d = sum(p.demand[u][b] for u in group)
        for u in group:
            f = val[c] * p.demand[u][b] / d
            if f > 1e-9:
                sol.flows[u, loc, b] = f
    return sol


def _warm_start(lp: Lp, opts: Options) -> tuple[list[float] | None, Result | None]:
    """(a first incumbent for the MILP, or the MILP's result when its LP relaxation settles
    it: an optimum with integer replica counts is the MILP's).

    The LP relaxation with every replica count rounded up is feasible (capacity, cover and
    share rows stay satisfied; HiGHS drops it if a budget row is not). With
    `opts.support_mip`, better: the MILP restricted to the offerings the relaxation uses
    (every other count fixed at 0), started from that rounding. It is small and its optimum
    is usually the whole one's, which then only has to be proved; measured on the bundled
    catalog, HiGHS spends most of its time finding that point, not proving it."""
    t0 = time.perf_counter()
    r = run_highs(replace(lp, integer=[]), opts.time_limit, 1.0)
    if r.status == "infeasible":
        return None, None
    val = list(r.values)
    if r.status == "optimal" and all(abs(val[c] - round(val[c])) <= 1e-6 for c in lp.integer):
        for c in lp.integer:
            val[c] = float(round(val[c]))
        return None, Result("optimal", val, r.cost, r.cost, 0.0)
    for c in lp.integer:
        val[c] = min(float(math.ceil(val[c] - 1e-6)), lp.ub[c])
    ub = list(lp.ub)
    for c in lp.integer:
        if r.values[c] <= 1e-6:
            ub[c] = 0.0
    if not opts.support_mip or ub == lp.ub:  # (the support is everything: no smaller MILP)
        return val, None
    left = max(opts.time_limit - (time.perf_counter() - t0), 0.0) / 2
    # a node limit, not the time, ends it early: the start it gives (and so which of equally
    # cheap optima the full MILP returns) must not depend on the machine's load
    sub = run_highs(replace(lp, ub=ub), left, opts.gap_rel, val, SUPPORT_NODES)
    return (sub.values if sub.status != "infeasible" else val), None


SUPPORT_NODES = 500  # branch-and-bound nodes of the warm start's MILP on the LP's support


@dataclass(frozen=True, slots=True)
class Options:
    """How `solve` works; the defaults are the fast exact path, the switches are for measuring
    what each part buys (benchmarks/plan_speed.py)."""

    time_limit: float = 20.0
    gap_rel: float = 1e-4
    solver: str = "highs"  # "highs" | "cbc"
    backend: str = "highspy"  # "highspy" (model passed as arrays) | "pulp"
    split: bool = True  # solve independent geographic components apart
    tighten: bool = True  # the valid inequalities of `build_milp`
    multi_copy: bool = True  # saturation and k-copy dominance in `prune`
    warm_start: bool = True  # start HiGHS from the rounded-up LP relaxation
    support_mip: bool = True  # ... or better, from the MILP on the relaxation's support
    # only the LP relaxation (a lower bound; counts rounded up, gap None): for callers that
    # need the cost bound or which offerings a near-optimal placement uses, fast
    relaxation: bool = False
    far_prune: bool = True  # under a region share, dominance across locations (`far_prune`)
    # branch-and-bound nodes at most: unlike the time limit, the same on a busy machine, so a
    # solve it stops still gives the same answer every run (status "feasible", gap printed)
    node_limit: int = 500


def solve(p: Problem, *, time_limit: float = 20.0, gap_rel: float = 1e-4, solver: str = "highs",
          split: bool = True, options: Options | None = None) -> Solution:  # fmt: skip
    """Cheapest placement of `p`; `status == "infeasible"` when there is none. `options`, when
    given, overrides the keyword arguments.

    Independent geographic components are solved apart. min_replicas does not tie them when
    there are at least that many components with demand (each holds a replica); a budget,
    a cloud share or a spot share does, and then they are solved as one MILP. (Solving them
    apart under a spot share, repairing the spot total and bounding with a Lagrangian was
    tried: it found the optimum and a 0.24% gap but took longer than the single MILP.)
    """
    opts = options or Options(time_limit, gap_rel, solver, split=split)
    t0 = time.perf_counter()
    stats = Reduction()
    priced = _launch_priced(p)
    feats = features(priced, opts.multi_copy)
    idx = prune(priced, stats, multi_copy=opts.multi_copy, f=feats)
    if p.running:  # kept replicas cost less than prune assumed: what runs stays a column
        idx = sorted(set(idx) | {i for i, r in p.running.items() if r > 0})
    prune_s = time.perf_counter() - t0
    far_s = 0.0
    if opts.far_prune and p.max_region_share < 1 and not p.running:
        t1 = time.perf_counter()
        idx, far_s = _far_prune(p, idx, opts, feats if opts.multi_copy else None)
        prune_s += time.perf_counter() - t1 - far_s
        stats.far = len(idx)
    total = p.total_demand
    comps = [c for c in components(p, idx) if any(sum(p.demand[u]) > 0 for u in c[0])]
    out = Solution("optimal", num_offerings=len(idx), num_components=max(len(comps), 1),
                   build_time_s=prune_s, prune_time_s=prune_s, reduction=stats)  # fmt: skip
    out.solve_time_s = far_s
    whole = [(list(p.demand), idx)]
    tied = p.max_cloud_share < 1 or p.budget is not None or p.min_replicas > len(comps)
    if not opts.split or len(comps) <= 1 or tied:
        out.num_components = 1
        return _finish(p, out, [_solve_component(p, *whole[0], total, opts)])
    if (p.max_spot_share < 1 or p.spot_spread > 1) and any(p.offerings[i].spot for i in idx):
        # a spot share ties them (solving them apart, then repairing the spot total, was
        # measured slower than solving them as one)
        out.num_components = 1
        return _finish(p, out, [_solve_component(p, *whole[0], total, opts)])
    q = replace(p, min_replicas=0)
    return _finish(
        p, out, [_solve_component(q, users, members, total, opts) for users, members in comps]
    )


def _launch_priced(p: Problem) -> Problem:
    """`p` with each offering's price raised by its launch cost, for pruning: a replica costs
    at most that (exactly that where none runs), so dominance on these prices keeps the
    optimum once the running offerings are added back."""
    if not p.launch_cost:
        return p
    offs = [replace(o, price=o.price + c) if c else o
            for o, c in zip(p.offerings, p.launch_cost, strict=True)]  # fmt: skip
    return replace(p, offerings=offs)


def _far_prune(p: Problem, idx: list[int], opts: Options,
               feats: Features | None = None) -> tuple[list[int], float]:  # fmt: skip
    """`idx` after `far_prune`, and the seconds spent finding its upper bound: the warm
    start's placement (`_warm_start`) on the offerings with dominators at few other
    locations, tried on wider sets while it finds none."""
    counts = far_dominators(p, idx, f=feats)
    fewest = math.ceil(1 / p.max_region_share - 1e-9)  # locations any placement uses
    t0 = time.perf_counter()
    sub = replace(opts, time_limit=opts.time_limit / 4)  # (SUPPORT_NODES limits it first)
    for t in (fewest + 1, 2 * fewest + 2, 4 * fewest + 4):
        few = [i for i, c in zip(idx, counts.tolist(), strict=True) if c < t]
        if len(few) == len(idx):
            break
        built = build_milp(p, list(p.demand), few, p.total_demand, opts.tighten)
        if built is None:
            continue
        lp = built[0]
        start, exact = _warm_start(lp, sub)
        val = exact.values if exact is not None else start
        if val is not None and _feasible(lp, val):
            upper = float(np.dot(lp.cost, val))
            return far_prune(p, idx, counts, upper * (1 + 1e-9)), time.perf_counter() - t0
    return idx, time.perf_counter() - t0


def _feasible(lp: Lp, val: list[float], tol: float = 1e-6) -> bool:
    """Whether `val` meets every bound and row of `lp` (integers integral)."""
    x = np.asarray(val, dtype=float)
    if (x < np.asarray(lp.lb) - tol).any() or (x > np.asarray(lp.ub) + tol).any():
        return False
    if lp.integer and (np.abs(x[lp.integer] - np.round(x[lp.integer])) > tol).any():
        return False
    if not lp.num_rows:
        return True
    start = np.asarray(lp.start)
    terms = np.asarray(lp.value) * x[np.asarray(lp.index, dtype=int)]
    act = np.add.reduceat(terms, start[:-1]) if len(terms) else np.zeros(lp.num_rows)
    scale = 1 + np.abs(act)
    return bool((act >= np.asarray(lp.rlb) - tol * scale).all()
                and (act <= np.asarray(lp.rub) + tol * scale).all())  # fmt: skip


def _account(out: Solution, parts: list[Solution]) -> None:
    """Add the time and model size of solves whose placements are not kept."""
    for s in parts:
        out.build_time_s += s.build_time_s
        out.solve_time_s += s.solve_time_s
        out.num_vars += s.num_vars
        out.num_rows += s.num_rows


def _finish(p: Problem, out: Solution, parts: list[Solution]) -> Solution:
    """`out` with the placements of the component solutions `parts` added up."""
    out.cost, out.bound = 0.0, 0.0
    out.counts, out.rates, out.flows = {}, {}, {}
    out.status = "optimal"
    _account(out, parts)
    for sub in parts:
        out.solver = sub.solver or out.solver
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
    if p.launch_cost:
        out.launch_cost = sum(p.launch_cost[i] * max(0, n - p.running.get(i, 0))
                              for i, n in out.counts.items())  # fmt: skip
    if p.budget is not None and out.cost - out.launch_cost > p.budget + 1e-6:
        out.status, out.cost = "infeasible", math.inf
        return out
    if math.isfinite(out.bound) and out.cost > 0:
        out.gap = max(0.0, (out.cost - out.bound) / out.cost)
    elif out.bound == -math.inf:
        out.gap = None
    else:
        out.gap = 0.0
    return out
