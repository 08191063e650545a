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
          (on the objective: instances and egress).

Before building it (`prune`): offerings that cannot serve anything or reach no user are
dropped; interchangeable ones are aggregated onto the cheapest; an offering is dropped when
k copies of another one in its constraint group (market/cloud/region, as the active share
constraints require) reach a superset of its users, carry whatever it could and cost no
more (k = 1: plain dominance; an offering that can take all the demand it reaches with one
replica counts as unlimited). Users that reach the same locations share flow variables.
The model (`_build`) adds valid inequalities that tighten the LP relaxation without cutting
off integer points: capacity from the most work an offering can get, per-class linking,
replica covers per user and per geographic group. The problem splits into independent
geographic components when no constraint couples them. HiGHS solves each through highspy
(arrays, no modelling layer), warm-started from the optimum of the same MILP restricted to
the offerings its LP relaxation uses (an integral relaxation is the answer outright); its
own status, dual bound and gap are read back (the backends: `skybroker.milp`). pulp builds the same model for CBC, the
fallback when highspy is missing (pulp says "Optimal" even when a time limit stopped the
solver, and hides CBC's bound: the gap is then unknown).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from skybroker.milp import Lp, Result, has_highspy, run_highs, run_pulp


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

    @property
    def num_classes(self) -> int:
        return len(next(iter(self.demand.values())))

    @property
    def total_demand(self) -> float:
        return float(sum(sum(d) for d in self.demand.values()))


@dataclass(slots=True)
class Reduction:
    """How many offering classes each reduction step left (for reports and benchmarks)."""

    useful: int = 0  # reach a user with demand in a class they can serve
    aggregated: int = 0  # after merging interchangeable ones (same group, capacity, reach)
    dominated: int = 0  # after single-copy dominance
    multi_copy: int = 0  # after k-copy dominance


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
    num_vars: int = 0  # columns of the MILP(s) solved
    num_rows: int = 0
    prune_time_s: float = 0.0  # included in build_time_s
    reduction: Reduction | None = None

    @property
    def hourly(self) -> float:
        return self.cost


# --- pruning and aggregation ----------------------------------------------------------------


def _arrays(p: Problem) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per offering: location code, reach (O x U bool), reachable demand rd (O x B), mu
    (O x B), egress (O x B)."""
    users = list(p.demand)
    demand = np.array([p.demand[u] for u in users], dtype=float).reshape(len(users), -1)
    no, nb = len(p.offerings), demand.shape[1]
    codes: dict[str, int] = {}
    loc = np.array([codes.setdefault(o.location, len(codes)) for o in p.offerings], dtype=int)
    at = np.array([[name in p.reach[u] for u in users] for name in codes], dtype=bool)
    reach = at.reshape(len(codes), len(users))[loc] if no else np.zeros((0, len(users)), bool)
    mu = np.array([o.mu for o in p.offerings], dtype=float).reshape(no, nb)
    zero = (0.0,) * nb
    egress = np.array([o.egress or zero for o in p.offerings], dtype=float).reshape(no, nb)
    return loc, reach, reach.astype(float) @ demand, mu, egress


def max_load(mu: np.ndarray, rd: np.ndarray) -> np.ndarray:
    """Replicas' worth of work each offering could ever be given: sum_b rd[b] / mu[b] (the
    classes it cannot serve excluded)."""
    safe = np.where(mu > 0, mu, 1.0)
    return np.where((mu > 0) & (rd > 0), rd / safe, 0.0).sum(-1)


def prune(p: Problem, stats: Reduction | None = None, *, multi_copy: bool = True) -> list[int]:
    """Indices of offerings that some optimal placement may use; all others are dropped.

    An offering A is dropped when another one B of the same constraint group (market, cloud,
    region as the active share constraints require) reaches every user A reaches, has no
    higher egress on any class A can serve, and k copies of B cost no more than one A while
    carrying whatever one A could: k = ceil(min(max_b mu_A/mu_B, sum_b rd_A/mu_B)), rd_A
    being the demand A can reach at all. Replacing each A by k B's keeps a placement feasible
    (replica count, shares, budget included) and no dearer, so the optimum is unchanged.
    Offerings with a max_count are never used to drop others. Steps, cheapest first:
    1. aggregation: interchangeable offerings (same group, capacity on every reachable class,
       egress and reach) collapse onto the cheapest one;
    2. single-copy dominance (k = 1), vectorised over the whole catalog;
    3. k-copy dominance among the survivors.
    An offering that could serve all the demand it reaches with one replica ("saturated")
    counts as having unlimited capacity in steps 1-2: one copy of it replaces any A.
    """
    loc, reach, rd, mu, egress = _arrays(p)
    stats = stats if stats is not None else Reduction()
    serve = (mu > 0) & (rd > 0)  # classes each offering can be given
    useful = serve.any(1)
    saturated = (max_load(mu, rd) <= 1 + 1e-12) & multi_copy
    cap = np.where(serve, np.where(saturated[:, None], np.inf, mu), 0.0)
    negeg = np.where(rd > 0, -egress, -np.inf)  # egress of classes it never serves is moot
    offs = p.offerings
    price = np.array([o.price for o in offs], dtype=float)
    no = len(offs)
    # constraint groups, as integer codes: (spot, cloud, location, own group if max_count)
    group = np.zeros((no, 4), dtype=int)
    if p.max_spot_share < 1:
        group[:, 0] = [o.spot for o in offs]
    if p.max_cloud_share < 1:
        clouds: dict[str, int] = {}
        group[:, 1] = [clouds.setdefault(o.cloud, len(clouds)) for o in offs]
    if p.max_region_share < 1:
        group[:, 2] = loc
    group[:, 3] = [i + 1 if o.max_count is not None else 0 for i, o in enumerate(offs)]
    stats.useful = int(useful.sum())
    # aggregation: the first (cheapest, then lowest index) of each interchangeable set
    order = np.lexsort((np.arange(no), price))
    order = order[useful[order]]
    row = np.ascontiguousarray(np.hstack([group, cap, negeg, reach]).astype(float)[order])
    first: dict[bytes, int] = {}
    for j, k in enumerate(row.view(np.dtype((np.void, row.shape[1] * 8))).ravel().tolist()):
        first.setdefault(k, j)
    order = order[sorted(first.values())]
    stats.aggregated = len(order)
    keep: list[int] = []
    dom = 0
    members: dict[tuple, list[int]] = {}
    for i in order.tolist():
        members.setdefault(tuple(group[i]), []).append(i)
    for idx in members.values():
        ix = np.array(idx, dtype=int)
        ix = ix[_undominated(np.hstack([cap[ix], negeg[ix], reach[ix].astype(float)]))]
        dom += len(ix)
        if multi_copy:
            ix = _multi_copy(price, ix, mu, rd, negeg, reach, group[:, 3] > 0)
        keep.extend(int(i) for i in ix)
    stats.dominated, stats.multi_copy = dom, len(keep)
    return sorted(keep)


def _undominated(feat: np.ndarray, chunk: int = 256) -> np.ndarray:
    """Mask of rows not dominated by an earlier row (earlier = no dearer; dominated = some
    earlier row is >= on every feature). Dominance is transitive, so comparing against the
    survivors only is exact."""
    alive = np.zeros(len(feat), dtype=bool)
    for c0 in range(0, len(feat), chunk):
        part = feat[c0 : c0 + chunk]
        surv = feat[alive]
        dom = np.zeros(len(part), dtype=bool)
        if len(surv):
            dom |= (surv[None, :, :] >= part[:, None, :]).all(2).any(1)
        within = (part[None, :, :] >= part[:, None, :]).all(2)  # [a, b]: b >= a
        dom |= np.tril(within, -1).any(1)
        alive[c0 : c0 + len(part)] = ~dom
    return alive


def _multi_copy(price: np.ndarray, ix: np.ndarray, mu: np.ndarray, rd: np.ndarray,
                negeg: np.ndarray, reach: np.ndarray, limited: np.ndarray) -> np.ndarray:  # fmt: skip
    """Drop A (later in ix) when k copies of an earlier B cost no more (see `prune`)."""
    if len(ix) < 2:
        return ix
    m, r = mu[ix], rd[ix]
    a_cap = np.where((m > 0) & (r > 0), m, 0.0)  # [A, b]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(a_cap[:, None, :] > 0, a_cap[:, None, :] / m[None, :, :], 0.0)  # [A,B,b]
        k1 = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf).max(2)
        work = np.where(a_cap[:, None, :] > 0, r[:, None, :] / m[None, :, :], 0.0)
        k2 = np.nan_to_num(work, nan=np.inf, posinf=np.inf).sum(2)
    k = np.maximum(np.ceil(np.minimum(k1, k2) - 1e-9), 1.0)
    pr, lim = price[ix], limited[ix]
    ok = (k * pr[None, :] <= pr[:, None] + 1e-12) & ~lim[None, :]
    ok &= (negeg[ix][None, :, :] >= negeg[ix][:, None, :]).all(2)
    ok &= (reach[ix][None, :, :] >= reach[ix][:, None, :]).all(2)
    ok &= np.tri(len(ix), k=-1, dtype=bool)  # B strictly earlier than A: no cycles
    return ix[~ok.any(1)]


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


# --- the integer program ------------------------------------------------------------------


@dataclass(slots=True)
class _Vars:
    n: dict[int, int] = field(default_factory=dict)  # offering -> column
    y: dict[tuple[int, int], int] = field(default_factory=dict)  # (offering, class) -> column
    x: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (user, location, class)
    split: dict[str, list[str]] = field(default_factory=dict)  # x's user -> users it stands for


def _build(p: Problem, users: list[str], idx: list[int], total: float,
           tighten: bool) -> tuple[Lp, _Vars] | None:  # fmt: skip
    """The component's MILP; None when some user's class has no offering within reach.

    With `tighten`, valid inequalities that cut off fractional points but no integer one:
    - capacity from the most work an offering can get, L = sum_b rd_b / mu_b (rd: demand it
      reaches): load <= min(n, L) for integer n, whose convex hull adds
      load - f n <= floor(L) (1 - f), f = frac(L) (for L < 1: load <= L n);
    - per class, y_b <= rd_b n where rd_b < mu_b;
    - covers: the offerings within reach of a user hold at least ceil(sum_b d_b / max mu_b)
      replicas (each replica does at most one replica's work); so do those within reach of
      each geographic group of users, and the whole component.
    Users that reach the same locations are interchangeable: one flow variable per class
    serves them all (`_Vars.split` shares it out afterwards).
    """
    nb, lp, v = p.num_classes, Lp(), _Vars()
    inf = math.inf
    dem = {u: p.demand[u] for u in users}
    at: dict[str, list[int]] = {}
    for i in idx:
        at.setdefault(p.offerings[i].location, []).append(i)
    rd = {i: [sum(dem[u][b] for u in users if p.offerings[i].location in p.reach[u])
              for b in range(nb)] for i in idx}  # fmt: skip
    for i in idx:
        o = p.offerings[i]
        load = sum(rd[i][b] / o.mu[b] for b in range(nb) if o.mu[b] > 0 and rd[i][b] > 0)
        ub = max(math.ceil(load - 1e-9), p.min_replicas)
        if p.budget is not None and o.price > 0:
            ub = min(ub, int(p.budget / o.price + 1e-9))
        if o.max_count is not None:
            ub = min(ub, o.max_count)
        v.n[i] = n = lp.col(0, ub, o.price, integer=True)
        terms = []
        for b in range(nb):
            if o.mu[b] > 0 and rd[i][b] > 0:
                eg = o.egress[b] if o.egress else 0.0
                v.y[i, b] = y = lp.col(0, rd[i][b], eg)
                terms.append((y, 1.0 / o.mu[b]))
        if tighten and 0 < load < 1:
            lp.row(-inf, 0, [*((c, a / load) for c, a in terms), (n, -1.0)])
        else:
            lp.row(-inf, 0, [*terms, (n, -1.0)])
            f = load - math.floor(load)
            if tighten and f > 1e-6:
                lp.row(-inf, math.floor(load) * (1 - f), [*terms, (n, -f)])
        if tighten:
            scale = min(1.0, load)
            for b in range(nb):
                if (i, b) in v.y and rd[i][b] < o.mu[b] * scale * (1 - 1e-9):
                    lp.row(-inf, 0, [(v.y[i, b], 1.0), (n, -rd[i][b])])
    x_at: dict[tuple[str, int], list[int]] = {}
    alike: dict[frozenset[str], list[str]] = {}
    for u in users:
        alike.setdefault(frozenset(p.reach[u] & at.keys()), []).append(u)
    for near, group in alike.items():
        g = group[0]
        v.split[g] = group
        for b in range(nb):
            d = sum(dem[u][b] for u in group)
            if d <= 0:
                continue
            terms = []
            for loc in sorted(near):
                if any((i, b) in v.y for i in at[loc]):
                    v.x[g, loc, b] = c = lp.col(0, d)
                    x_at.setdefault((loc, b), []).append(c)
                    terms.append((c, 1.0))
            if not terms:
                return None
            lp.row(d, d, terms)
    for loc, members in at.items():
        for b in range(nb):
            ys = [(v.y[i, b], 1.0) for i in members if (i, b) in v.y]
            lp.row(0, 0, ys + [(c, -1.0) for c in x_at.get((loc, b), [])])
        if p.max_region_share < 1:
            lp.row(-inf, p.max_region_share * total,
                   [(c, 1.0) for (i, _), c in v.y.items() if p.offerings[i].location == loc])  # fmt: skip
    if p.max_spot_share < 1:
        lp.row(-inf, p.max_spot_share * total,
               [(c, 1.0) for (i, _), c in v.y.items() if p.offerings[i].spot])  # fmt: skip
    if p.max_cloud_share < 1:
        for cloud in sorted({p.offerings[i].cloud for i in idx}):
            lp.row(-inf, p.max_cloud_share * total,
                   [(c, 1.0) for (i, _), c in v.y.items() if p.offerings[i].cloud == cloud])  # fmt: skip
    covers = [(list(users), p.min_replicas)]
    if tighten:
        covers[0] = (covers[0][0], max(p.min_replicas, _cover(p, users, idx, dem, v)))
        covers += [([u], _cover(p, [u], idx, dem, v)) for u in users if len(users) > 1]
        geo = [us for us, _ in components(replace(p, demand=dem), idx)]
        covers += [(us, _cover(p, us, idx, dem, v)) for us in geo if 1 < len(us) < len(users)]
    for us, need in covers:
        near = [v.n[i] for i in idx if any(p.offerings[i].location in p.reach[u] for u in us)]
        if need > 0:
            lp.row(need, inf, [(c, 1.0) for c in near])
    if p.budget is not None:  # what the user pays: instances and egress
        egress = [(c, p.offerings[i].egress[b]) for (i, b), c in v.y.items()
                  if p.offerings[i].egress and p.offerings[i].egress[b] > 0]  # fmt: skip
        lp.row(-inf, p.budget, [(v.n[i], p.offerings[i].price) for i in idx] + egress)
    return lp, v


def _cover(p: Problem, us: list[str], idx: list[int], dem: dict, v: _Vars) -> int:
    """Fewest replicas within reach of users `us` that can do their work."""
    work = 0.0
    for b in range(p.num_classes):
        d = sum(dem[u][b] for u in us)
        if d > 0:
            near = [p.offerings[i].mu[b] for i in idx if (i, b) in v.y
                    and any(p.offerings[i].location in p.reach[u] for u in us)]  # fmt: skip
            work += d / max(near, default=math.inf)
    return math.ceil(work - 1e-9)


def _solve_component(p: Problem, users: list[str], idx: list[int], total: float,
                     opts: Options) -> Solution:  # fmt: skip
    t0 = time.perf_counter()
    built = _build(p, users, idx, total, opts.tighten)
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
        r, name = r or run_highs(lp, left, opts.gap_rel, start), "HiGHS"
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
    sub = run_highs(replace(lp, ub=ub), left, opts.gap_rel, val)
    return (sub.values if sub.status != "infeasible" else val), None


@dataclass(frozen=True, slots=True)
class Options:
    """How `solve` works; the defaults are the fast exact path, the switches are for measuring
    what each part buys (benchmarks/plan_speed.py)."""

    time_limit: float = 20.0
    gap_rel: float = 1e-4
    solver: str = "highs"  # "highs" | "cbc"
    backend: str = "highspy"  # "highspy" (model passed as arrays) | "pulp"
    split: bool = True  # solve independent geographic components apart
    tighten: bool = True  # the valid inequalities of `_build`
    multi_copy: bool = True  # saturation and k-copy dominance in `prune`
    warm_start: bool = True  # start HiGHS from the rounded-up LP relaxation
    support_mip: bool = True  # ... or better, from the MILP on the relaxation's support
    # only the LP relaxation (a lower bound; counts rounded up, gap None): for callers that
    # need the cost bound or which offerings a near-optimal placement uses, fast
    relaxation: bool = False


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
    idx = prune(p, stats, multi_copy=opts.multi_copy)
    prune_s = time.perf_counter() - t0
    total = p.total_demand
    comps = [c for c in components(p, idx) if any(sum(p.demand[u]) > 0 for u in c[0])]
    out = Solution("optimal", num_offerings=len(idx), num_components=max(len(comps), 1),
                   build_time_s=prune_s, prune_time_s=prune_s, reduction=stats)  # fmt: skip
    whole = [(list(p.demand), idx)]
    tied = p.max_cloud_share < 1 or p.budget is not None or p.min_replicas > len(comps)
    if not opts.split or len(comps) <= 1 or tied:
        out.num_components = 1
        return _finish(p, out, [_solve_component(p, *whole[0], total, opts)])
    if p.max_spot_share < 1 and any(p.offerings[i].spot for i in idx):
        # a spot share ties them (solving them apart, then repairing the spot total, was
        # measured slower than solving them as one)
        out.num_components = 1
        return _finish(p, out, [_solve_component(p, *whole[0], total, opts)])
    q = replace(p, min_replicas=0)
    return _finish(
        p, out, [_solve_component(q, users, members, total, opts) for users, members in comps]
    )


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
    if p.budget is not None and out.cost > p.budget + 1e-6:
        out.status, out.cost = "infeasible", math.inf
        return out
    if math.isfinite(out.bound) and out.cost > 0:
        out.gap = max(0.0, (out.cost - out.bound) / out.cost)
    elif out.bound == -math.inf:
        out.gap = None
    else:
        out.gap = 0.0
    return out
