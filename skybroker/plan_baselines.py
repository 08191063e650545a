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

Both are mix-corrected as the plan is (`skybroker.plan_solve`): the single-kind fleets go
through the same loop, and a SkyPilot-style instance is sized by simulating it serving the
whole mix of requests it gets (not by the linear rule).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from skybroker.optimizer import OfferingClass, Problem
from skybroker.plan_problem import Meta
from skybroker.plan_solve import BASELINE_MIX_ROUNDS, Search

Refine = Callable[[int], tuple[Problem, Meta]]
MixCap = Callable[[int, Meta, list[float]], float]


def compute_baselines(search: Search) -> tuple[dict, dict]:
    """The two baselines' costs and notes. The cheapest single GPU kind is found best first:
    every kind's fleet is bounded from below by its LP relaxation (on upper bounds of its
    capacities until searched), and the kinds are solved with the mix correction in the
    order of their bounds until the next bound is above the best corrected cost."""
    costs: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    rows = search.base[1].rows
    kinds = sorted({o.gpu for o, _, _ in rows})

    def only(gpu: str) -> Callable[[int], bool]:
        return lambda i: rows[i][0].gpu == gpu

    bound = {gpu: search.bound(only(gpu)) for gpu in kinds}
    best = (math.inf, "")
    for gpu in sorted(kinds, key=lambda g: (bound[g], g)):
        if not math.isfinite(bound[gpu]) or bound[gpu] >= best[0]:
            break
        mixed = search.mix_corrected(only(gpu), BASELINE_MIX_ROUNDS)
        if mixed is not None and mixed.sol.cost < best[0]:
            best = (mixed.sol.cost, gpu)
    costs["cheapest_single_gpu"] = best[0] if best[1] else None
    notes["cheapest_single_gpu"] = (f"all replicas {best[1]} (best of each GPU kind solved alone)"
                                    if best[1] else "no single GPU kind meets the spec alone")  # fmt: skip

    def refine(i: int) -> tuple[Problem, Meta]:
        search.refine({search.base[1].perf[i].config})
        return search.view({})

    p, meta = search.view({})
    costs["skypilot"], notes["skypilot"] = skypilot_baseline(p, meta, refine,
                                                             search.mix_capacity)  # fmt: skip
    return costs, notes


def mix_capacity(oc: OfferingClass, dem: list[float]) -> float:
    """req/s of the demand mix `dem` one replica of `oc` serves (the linear rule)."""
    s = sum(dem)
    if s <= 0 or any(d > 0 and m <= 0 for d, m in zip(dem, oc.mu, strict=True)):
        return 0.0
    return 1 / sum(d / s / m for d, m in zip(dem, oc.mu, strict=True) if d > 0)


def skypilot_baseline(p: Problem, meta: Meta, refine: Refine | None = None,
                      mix_cap: MixCap | None = None) -> tuple[float | None, str]:  # fmt: skip
    """SkyPilot's way (module docstring): ($/h, what it runs) or (None, why not). An offering
    whose capacities are upper bounds is searched (`refine`) only when it would be chosen: on
    bounds the candidates are a superset and each one's key (price, -capacity) no higher. An
    instance is sized by `mix_cap` (the simulated mix; default the linear rule)."""
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
            p, meta = refine(i)

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
        for i, oc, t in parts:
            cap = mix_cap(i, meta, dem) if mix_cap is not None else mix_capacity(oc, dem)
            if cap <= 0:
                return None
            n = math.ceil(t * total / cap - 1e-9)
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
