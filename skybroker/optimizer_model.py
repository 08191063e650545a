"""The placement MILP of one component (`build_milp`): its columns, rows and the valid
inequalities that tighten its LP relaxation; and the split of a problem into independent
geographic components (`components`). `skybroker.optimizer` documents the formulation and
solves it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from skybroker.milp import Lp
from skybroker.prune import max_load, share_caps

if TYPE_CHECKING:
    from skybroker.optimizer import Problem


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


@dataclass(slots=True)
class Vars:
    n: dict[int, int] = field(default_factory=dict)  # offering -> column
    y: dict[tuple[int, int], int] = field(default_factory=dict)  # (offering, class) -> column
    x: dict[tuple[str, str, int], int] = field(default_factory=dict)  # (user, location, class)
    split: dict[str, list[str]] = field(default_factory=dict)  # x's user -> users it stands for
    rd: dict[int, list[float]] = field(default_factory=dict)  # most req/s per class o can get


def build_milp(p: Problem, users: list[str], idx: list[int], total: float,
           tighten: bool) -> tuple[Lp, Vars] | None:  # fmt: skip
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
    serves them all (`Vars.split` shares it out afterwards).
    """
    nb, lp, v = p.num_classes, Lp(), Vars()
    inf = math.inf
    dem = {u: p.demand[u] for u in users}
    at: dict[str, list[int]] = {}
    for i in idx:
        at.setdefault(p.offerings[i].location, []).append(i)
    share = share_caps(p)
    rd = {i: [min(sum(dem[u][b] for u in users if p.offerings[i].location in p.reach[u]),
                  share[i]) for b in range(nb)] for i in idx}  # fmt: skip
    v.rd = rd
    for i in idx:
        o = p.offerings[i]
        load = float(max_load(np.array(o.mu), np.array(rd[i]), share[i]))
        ub = max(math.ceil(load - 1e-9), p.min_replicas)
        if p.budget is not None and o.price > 0:
            ub = min(ub, int(p.budget / o.price + 1e-9))
        if o.max_count is not None:
            ub = min(ub, o.max_count)
        launch = p.launch_cost[i] if p.launch_cost else 0.0
        v.n[i] = n = lp.col(0, ub, o.price + launch, integer=True)
        if launch > 0 and p.running.get(i, 0) > 0:  # kept replicas: their launch refunded
            keep = lp.col(0, min(p.running[i], ub), -launch, integer=True)
            lp.row(-inf, 0, [(keep, 1.0), (n, -1.0)])
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
            rate = _rate_cap(o.mu, rd[i], float(share[i]))
            if len(terms) > 1 and rate < sum(rd[i]) * (1 - 1e-9):
                lp.row(-inf, 0, [*((c, 1.0) for c, _ in terms), (n, -rate)])
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
    if p.spot_spread > 1:  # each location's spot traffic <= 1/N of all spot traffic
        spot = [(c, i) for (i, _), c in v.y.items() if p.offerings[i].spot]
        for loc in sorted({p.offerings[i].location for _, i in spot}):
            lp.row(-inf, 0, [(c, (p.offerings[i].location == loc) - 1 / p.spot_spread)
                             for c, i in spot])  # fmt: skip
    if p.max_cloud_share < 1:
        for cloud in sorted({p.offerings[i].cloud for i in idx}):
            lp.row(-inf, p.max_cloud_share * total,
                   [(c, 1.0) for (i, _), c in v.y.items() if p.offerings[i].cloud == cloud])  # fmt: skip
    covers = [(list(users), p.min_replicas)]
    if tighten:
        covers[0] = (covers[0][0], max(p.min_replicas, _cover(p, users, idx, dem, v, share)))
        covers += [([u], _cover(p, [u], idx, dem, v, share)) for u in users if len(users) > 1]
        geo = [us for us, _ in components(replace(p, demand=dem), idx)]
        covers += [
            (us, _cover(p, us, idx, dem, v, share)) for us in geo if 1 < len(us) < len(users)
        ]
    for us, need in covers:
        near = [v.n[i] for i in idx if any(p.offerings[i].location in p.reach[u] for u in us)]
        if need > 0:
            lp.row(need, inf, [(c, 1.0) for c in near])
    if tighten and p.max_spot_share < 1 and sum(map(sum, dem.values())) >= total * (1 - 1e-9):
        # at least (1 - spot share) of all traffic runs on demand
        od = [i for i in idx if not p.offerings[i].spot]
        most = max((_per_replica(p, i, v, share) for i in od), default=0.0)
        need = math.ceil((1 - p.max_spot_share) * total / most - 1e-9) if most > 0 else 0
        if need > 0:
            lp.row(need, inf, [(v.n[i], 1.0) for i in od])
    if p.budget is not None:  # what the user pays: instances and egress
        egress = [(c, p.offerings[i].egress[b]) for (i, b), c in v.y.items()
                  if p.offerings[i].egress and p.offerings[i].egress[b] > 0]  # fmt: skip
        lp.row(-inf, p.budget, [(v.n[i], p.offerings[i].price) for i in idx] + egress)
    return lp, v


def _rate_cap(mu: tuple[float, ...], rd: list[float], share: float) -> float:
    """Most req/s one replica serves: its fastest classes first (up to the demand it can get
    of each) until its work is one replica's, within its share cap. n replicas serve at most
    n times that (the most they serve is concave in n)."""
    left, rate = 1.0, 0.0
    for m, d in sorted(((m, d) for m, d in zip(mu, rd, strict=True) if m > 0 and d > 0),
                       reverse=True):  # fmt: skip
        take = min(d, left * m)
        rate += take
        left -= take / m
        if left <= 1e-12:
            break
    return min(rate, share)


def _per_replica(p: Problem, i: int, v: Vars, share: np.ndarray) -> float:
    """Most req/s one replica of offering i serves (`_rate_cap`, on the classes it can get)."""
    o = p.offerings[i]
    rd = [v.rd[i][b] if (i, b) in v.y else 0.0 for b in range(p.num_classes)]
    return _rate_cap(o.mu, rd, float(share[i]))


def _cover(p: Problem, us: list[str], idx: list[int], dem: dict, v: Vars,
           share: np.ndarray) -> int:  # fmt: skip
    """Fewest replicas within reach of users `us` that can do their work (each replica does
    at most one replica's work, and serves at most `_per_replica` req/s)."""
    work, rate = 0.0, 0.0
    near_all = [i for i in idx if any(p.offerings[i].location in p.reach[u] for u in us)]
    for b in range(p.num_classes):
        d = sum(dem[u][b] for u in us)
        if d > 0:
            rate += d
            near = [p.offerings[i].mu[b] for i in near_all if (i, b) in v.y]
            work += d / max(near, default=math.inf)
    most = max((_per_replica(p, i, v, share) for i in near_all), default=0.0)
    by_rate = math.ceil(rate / most - 1e-9) if most > 0 else 0
    return max(math.ceil(work - 1e-9), by_rate)
