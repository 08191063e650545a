"""Which offering classes some optimal placement may use (`skybroker.optimizer`'s first step).

`prune`: offerings that cannot serve anything or reach no user are dropped; interchangeable
ones are aggregated onto the cheapest; an offering is dropped when k copies of another one
in its constraint group (market/cloud/region, as the active share constraints require) reach
a superset of its users, carry whatever it could and cost no more. `far_dominated`: under
a region share, an offering is dropped when offerings at more other locations than an optimal
placement can have replicas each dominate it (one of those locations is then free to take
its traffic). Each step keeps the optimum; tests/test_optimizer.py checks it on brute force.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from skybroker.optimizer import Problem


@dataclass(slots=True)
class Reduction:
    """How many offering classes each reduction step left (for reports and benchmarks)."""

    useful: int = 0  # reach a user with demand in a class they can serve
    aggregated: int = 0  # after merging interchangeable ones (same group, capacity, reach)
    dominated: int = 0  # after single-copy dominance
    multi_copy: int = 0  # after k-copy dominance
    far: int = 0  # after dominance across locations (under a region share; 0: not run)


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


def share_caps(p: Problem) -> np.ndarray:
    """Most req/s (all classes together) one offering can ever be given: the whole demand,
    capped by the region share at its location, the spot share (over the spot spread) if on
    spot and its cloud's share (each is a bound on the sum of the group's traffic, so on every
    member's)."""
    total = p.total_demand
    cap = np.full(len(p.offerings), total, dtype=float)
    if p.max_region_share < 1:
        cap = np.minimum(cap, p.max_region_share * total)
    if p.max_cloud_share < 1:
        cap = np.minimum(cap, p.max_cloud_share * total)
    if p.max_spot_share < 1 or p.spot_spread > 1:  # (a location's spot: 1/N of all spot)
        spot = np.array([o.spot for o in p.offerings], dtype=bool)
        cap = np.where(spot, np.minimum(cap, p.max_spot_share * total / p.spot_spread), cap)
    return cap


def max_load(mu: np.ndarray, rd: np.ndarray, cap: np.ndarray | None = None) -> np.ndarray:
    """Replicas' worth of work each offering could ever be given: sum_b y[b] / mu[b] at most,
    over 0 <= y <= rd (the demand it reaches per class) with sum_b y <= cap (`share_caps`),
    the classes it cannot serve excluded. Greedy: the slowest classes fill the cap first."""
    safe = np.where(mu > 0, mu, 1.0)
    inv = np.where((mu > 0) & (rd > 0), 1.0 / safe, 0.0)
    y = np.where(inv > 0, rd, 0.0)
    if cap is not None:
        order = np.argsort(-inv, axis=-1, kind="stable")
        ys = np.take_along_axis(y, order, -1)
        before = np.cumsum(ys, -1) - ys
        ys = np.clip(np.asarray(cap, dtype=float)[..., None] - before, 0.0, ys)
        return (ys * np.take_along_axis(inv, order, -1)).sum(-1)
    return (y * inv).sum(-1)


def prune(
    p: Problem,
    stats: Reduction | None = None,
    *,
    multi_copy: bool = True,
    f: Features | None = None,
) -> list[int]:
    """Indices of offerings that some optimal placement may use; all others are dropped.

    An offering A is dropped when another one B of the same constraint group (market, cloud,
    region as the active share constraints require; under a spot spread, a spot offering's
    location) reaches every user A reaches, has no
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
    f = f if f is not None else features(p, multi_copy)
    stats = stats if stats is not None else Reduction()
    loc, reach, rd, mu, cap, negeg, price = f.loc, f.reach, f.rd, f.mu, f.cap, f.negeg, f.price
    useful, no = f.useful, len(p.offerings)
    group = np.hstack([f.group[:, :2], np.zeros((no, 1), int), f.group[:, 2:]])
    if p.max_region_share < 1:
        group[:, 2] = loc
    elif p.spot_spread > 1:  # spot traffic moved to another location changes both shares
        group[:, 2] = np.where(group[:, 0] > 0, loc, -1)
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


@dataclass(slots=True)
class Features:
    loc: np.ndarray  # location code
    reach: np.ndarray  # [O, U] bool
    rd: np.ndarray  # [O, B] the most req/s of each class it can be given (reach, shares)
    mu: np.ndarray  # [O, B]
    cap: np.ndarray  # [O, B] mu where it can serve (inf if saturated), else 0
    negeg: np.ndarray  # [O, B] -egress (-inf where it never serves the class)
    price: np.ndarray
    useful: np.ndarray  # [O] bool
    group: np.ndarray  # [O, 3] codes: spot, cloud (where their share is active), max_count


def features(p: Problem, multi_copy: bool = True) -> Features:
    """Per offering what pruning compares (`prune` and `far_dominators` share one)."""
    loc, reach, rd, mu, egress = _arrays(p)
    share = share_caps(p)
    rd = np.minimum(rd, share[:, None])
    serve = (mu > 0) & (rd > 0)  # classes each offering can be given
    saturated = (max_load(mu, rd, share) <= 1 + 1e-12) & multi_copy
    cap = np.where(serve, np.where(saturated[:, None], np.inf, mu), 0.0)
    negeg = np.where(rd > 0, -egress, -np.inf)  # egress of classes it never serves is moot
    offs = p.offerings
    group = np.zeros((len(offs), 3), dtype=int)
    if p.max_spot_share < 1 or p.spot_spread > 1:
        group[:, 0] = [o.spot for o in offs]
    if p.max_cloud_share < 1:
        clouds: dict[str, int] = {}
        group[:, 1] = [clouds.setdefault(o.cloud, len(clouds)) for o in offs]
    group[:, 2] = [i + 1 if o.max_count is not None else 0 for i, o in enumerate(offs)]
    price = np.array([o.price for o in offs], dtype=float)
    return Features(loc, reach, rd, mu, cap, negeg, price, serve.any(1), group)


def far_dominators(
    p: Problem, idx: list[int], chunk: int = 1024, f: Features | None = None
) -> np.ndarray:
    """Per offering of `idx`: at how many other locations an offering of `idx` dominates it
    (same market/cloud group, no max_count, earlier in (price, index) order, at least its
    capacity on every class, no higher egress, reaching every user it reaches).

    Under a region share this is what `far_prune` needs: a placement of r replicas uses at
    most r locations, so when A has dominators at r or more other locations, one of them, B,
    sits where the placement has nothing; A's replicas and traffic move onto as many B's
    there (that location then carries A's traffic, within the share as A's location was),
    feasible and no dearer."""
    f = f if f is not None else features(p)
    ix = np.array(idx, dtype=int)
    if len(ix) == 0:
        return np.zeros(0, dtype=int)
    _, code = np.unique(f.loc[ix], return_inverse=True)
    by_loc = np.argsort(code, kind="stable")  # B's grouped by location, for reduceat
    starts = np.flatnonzero(np.r_[True, np.diff(code[by_loc]) != 0])
    feat = np.hstack([f.cap[ix], f.negeg[ix], f.reach[ix].astype(float)])
    rank = np.empty(len(ix), dtype=int)
    rank[np.lexsort((ix, f.price[ix]))] = np.arange(len(ix))
    grp = f.group[ix]
    free = grp[:, 2] == 0
    # the B side in location order once (no [A, B] copy per chunk), one row per feature
    feat_b, rank_b = np.ascontiguousarray(feat[by_loc].T), rank[by_loc]
    grp_b, free_b = np.ascontiguousarray(grp[by_loc].T), free[by_loc]
    out = np.zeros(len(ix), dtype=int)
    for a0 in range(0, len(ix), chunk):
        a = slice(a0, a0 + chunk)
        dom = (rank_b[None, :] < rank[a, None]) & free_b[None, :]  # [A, B]
        for k in range(2):
            dom &= grp_b[k][None, :] == grp[a, None, k]
        for k in range(feat.shape[1]):  # one feature at a time: no [A, B, F] temporary
            dom &= feat_b[k][None, :] >= feat[a, None, k]
        at = np.logical_or.reduceat(dom, starts, axis=1)  # [A, location]
        at[np.arange(at.shape[0]), code[a]] = False
        out[a] = at.sum(1)
    return out


def far_prune(p: Problem, idx: list[int], counts: np.ndarray, upper: float) -> list[int]:
    """`idx` without the offerings dominated at more locations than an optimal placement
    can have replicas (see `far_dominators`). An optimal placement costs at most `upper`
    (the cost of a feasible one), so its replicas are at most r with k on-demand ones at
    the cheapest on-demand price and the rest at the cheapest price within `upper`, k being
    the fewest on-demand replicas that carry (1 - spot share) of the traffic."""
    if not idx or not np.isfinite(upper):
        return list(idx)
    cheapest = min(p.offerings[i].price for i in idx)
    if cheapest <= 0:
        return list(idx)
    k, od_price = 0, cheapest
    od = [p.offerings[i] for i in idx if not p.offerings[i].spot]
    if p.max_spot_share < 1 and od:
        share = share_caps(p)[[i for i in idx if not p.offerings[i].spot]]
        rate = max(min(max(o.mu), c) for o, c in zip(od, share.tolist(), strict=True))
        k = int(np.ceil((1 - p.max_spot_share) * p.total_demand / rate - 1e-9)) if rate > 0 else 0
        od_price = min(o.price for o in od)
    most = int(k + (upper - k * od_price) / cheapest + 1e-9)
    return [i for i, c in zip(idx, counts.tolist(), strict=True) if c < most]
