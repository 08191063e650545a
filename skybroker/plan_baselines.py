"""The two baselines a plan is compared with, on the same capacity predictions.

- `cheapest_single_gpu`: the ILP restricted to one GPU kind (every configuration of it),
  best kind;
- `skypilot`: what SkyPilot does with the same spec: the cheapest instance type that fits
  the model and serves every request class, one engine per instance with tensor parallelism
  over all its GPUs (SkyPilot's vLLM recipes pass `--tensor-parallel-size` = the instance's
  GPU count), replicated to meet the rate. Spot as SkyServe runs it: the spot share of the
  replicas on the cheapest spot instance, the rest on on-demand (`base_ondemand_fallback_
  replicas`). It knows no RTT, so it is given the cheapest such instance reachable by all
  users, else one per user region; it honours `max_region_share` by filling the cheapest
  regions in turn up to the share.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace

from skybroker.optimizer import OfferingClass, Options, Problem, solve
from skybroker.plan_perf import ConfigKey
from skybroker.plan_problem import Meta

Refine = Callable[[set[ConfigKey]], tuple[Problem, Meta]]


def compute_baselines(p: Problem, meta: Meta, time_limit: float,
                      refine: Refine | None = None) -> tuple[dict, dict]:  # fmt: skip
    """The two baselines' costs and notes. The cheapest single GPU kind is found best first:
    every kind's fleet is bounded from below by its LP relaxation (on upper bounds of its
    capacities where `p` holds only those), and only the most promising kind is searched
    (`refine(configs)`) and solved exactly, until an exact cost is the lowest bound."""
    costs: dict[str, float | None] = {}
    notes: dict[str, str] = {}

    def single(p: Problem, meta: Meta, gpu: str, relax: bool) -> float:
        sub = [oc for oc, (o, _, _) in zip(p.offerings, meta.rows, strict=True) if o.gpu == gpu]
        s = solve(replace(p, offerings=sub), options=Options(time_limit, relaxation=relax))
        return s.cost if s.status != "infeasible" else math.inf

    bound = {gpu: single(p, meta, gpu, True) for gpu in sorted({o.gpu for o, _, _ in meta.rows})}
    solved: set[str] = set()  # kinds whose bound is their exact fleet cost
    best = (math.inf, "")
    while bound:
        cost, gpu = min((c, g) for g, c in bound.items())
        if not math.isfinite(cost):
            break
        if gpu in solved:
            best = (cost, gpu)
            break
        todo = {k for k in meta.configs_of(gpu) if not meta.all_perf[k].exact}  # type: ignore[union-attr]
        if refine is not None and todo:
            p, meta = refine(todo)
        bound[gpu] = single(p, meta, gpu, False)
        solved.add(gpu)
    costs["cheapest_single_gpu"] = best[0] if best[1] else None
    notes["cheapest_single_gpu"] = (f"all replicas {best[1]} (best of each GPU kind solved alone)"
                                    if best[1] else "no single GPU kind meets the spec alone")  # fmt: skip
    costs["skypilot"], notes["skypilot"] = skypilot_baseline(p, meta, refine)
    return costs, notes


def mix_capacity(oc: OfferingClass, dem: list[float]) -> float:
    """req/s of the demand mix `dem` one replica of `oc` serves (the linear rule)."""
    s = sum(dem)
    if s <= 0 or any(d > 0 and m <= 0 for d, m in zip(dem, oc.mu, strict=True)):
        return 0.0
    return 1 / sum(d / s / m for d, m in zip(dem, oc.mu, strict=True) if d > 0)


def skypilot_baseline(p: Problem, meta: Meta,
                      refine: Refine | None = None) -> tuple[float | None, str]:  # fmt: skip
    """SkyPilot's way (module docstring): ($/h, what it runs) or (None, why not). An offering
    whose capacities are upper bounds is searched (`refine`) only when it would be chosen: on
    bounds the candidates are a superset and each one's key (price, -capacity) no higher."""
    share = p.max_region_share

    def pick(users: list[str], dem: list[float], spot: bool,
             skip: set[str]) -> tuple[int, OfferingClass] | None:  # fmt: skip
        nonlocal p, meta
        while True:
            cands = [(i, oc) for i, oc in enumerate(p.offerings)
                     if oc.spot == spot and meta.dp[i] == 1 and oc.location not in skip
                     and all(oc.location in p.reach[u] for u in users)
                     and mix_capacity(oc, dem) > 0]  # fmt: skip
            if not cands:
                return None
            i, oc = min(cands, key=lambda c: (c[1].price, -mix_capacity(c[1], dem)))
            if meta.perf[i].exact or refine is None:
                return i, oc
            p, meta = refine({meta.perf[i].config})

    def fleet(users: list[str], min_n: int) -> tuple[float, str] | None:
        dem = [sum(p.demand[u][b] for u in users) for b in range(p.num_classes)]
        total = sum(dem)
        spot_frac = p.max_spot_share if pick(users, dem, True, set()) else 0.0
        used: dict[str, float] = {}  # location -> fraction of this group's traffic
        parts: list[tuple[int, OfferingClass, float]] = []  # (index, offering, fraction)
        carry = 0.0  # traffic no spot instance could take: on-demand takes it (fallback)
        for spot, frac in ((True, spot_frac), (False, 1 - spot_frac)):
            left = frac + carry
            while left > 1e-12:
                full = {loc for loc, f in used.items() if f >= share - 1e-12}
                got = pick(users, dem, spot, full)
                if got is None:
                    if not spot:
                        return None
                    break
                i, oc = got
                t = min(left, share - used.get(oc.location, 0.0))
                used[oc.location] = used.get(oc.location, 0.0) + t
                parts.append((i, oc, t))
                left -= t
            carry = max(left, 0.0)
        cost, what, count = 0.0, [], 0
        for _, oc, t in parts:
            n = math.ceil(t * total / mix_capacity(oc, dem) - 1e-9)
            if oc.max_count is not None and n > oc.max_count:
                return None
            eg = sum(e * d * t for e, d in zip(oc.egress, dem, strict=True)) if oc.egress else 0.0
            cost += n * oc.price + eg
            count += n
            what.append(f"{n} x {oc.key[2]}{' spot' if oc.spot else ''} in {oc.location}")
        if count < min_n:  # more of the cheapest part's instances
            _, oc, _ = min(parts, key=lambda x: x[1].price)
            cost += (min_n - count) * oc.price
            what.append(f"{min_n - count} x {oc.key[2]} (min_replicas)")
        return cost, "; ".join(what)

    whole = fleet(list(p.demand), max(p.min_replicas, 1))
    if whole is not None:
        return whole
    parts = [fleet([u], 1) for u in p.demand if sum(p.demand[u]) > 0]
    if any(x is None for x in parts):
        return None, "no single instance type fits and serves every request class"
    return sum(x[0] for x in parts if x), "; ".join(x[1] for x in parts if x)
