"""The placement ILP against brute force, and its reductions (aggregation, dominance, splitting,
tightening rows, warm start), each shown to keep the optimum."""

from __future__ import annotations

import dataclasses
import itertools
import math
import random

import highspy
import pytest

from skybroker.optimizer import (
    OfferingClass,
    Options,
    Problem,
    Reduction,
    Solution,
    components,
    prune,
    solve,
)


def _random_problem(rng: random.Random) -> Problem:
    locs = [f"{c}/r{i}" for c in ("aws", "gcp") for i in range(rng.randint(1, 2))]
    nb = rng.randint(1, 2)
    offs = []
    for k in range(rng.randint(2, 4)):
        loc = rng.choice(locs)
        mu = tuple(rng.choice([0.0, round(rng.uniform(0.8, 4.0), 2)]) if nb > 1 else round(rng.uniform(0.8, 4.0), 2)
                   for _ in range(nb))  # fmt: skip
        if not any(mu):
            mu = (1.5,) * nb
        spot = rng.random() < 0.4
        offs.append(OfferingClass((loc, k, spot), loc.split("/")[0], loc, round(rng.uniform(1, 10), 2),
                                  spot, mu, tuple(round(rng.uniform(0, 0.3), 3) for _ in range(nb))))  # fmt: skip
    users = [f"u{i}" for i in range(rng.randint(1, 2))]
    demand = {u: tuple(round(rng.uniform(0.2, 2.5), 2) for _ in range(nb)) for u in users}
    reach = {u: frozenset(rng.sample(locs, rng.randint(1, len(locs)))) for u in users}
    return Problem(
        offs, demand, reach,
        min_replicas=rng.choice([0, 1, 2, 3]),
        max_spot_share=rng.choice([1.0, 1.0, 0.5]),
        max_region_share=rng.choice([1.0, 1.0, 0.7]),
        max_cloud_share=rng.choice([1.0, 1.0, 0.8]),
        budget=rng.choice([None, None, round(rng.uniform(5, 30), 1)]),
    )  # fmt: skip


def _lp_egress(p: Problem, n: tuple[int, ...]) -> float | None:
    """Min egress for fixed replica counts: flows straight from users to offerings (an
    independent formulation of the continuous part), or None if infeasible."""
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    inf = highspy.kHighsInf
    nb, total = p.num_classes, p.total_demand
    cols: dict[tuple[str, int, int], int] = {}
    for u in p.demand:
        for o, off in enumerate(p.offerings):
            for b in range(nb):
                if off.location in p.reach[u] and off.mu[b] > 0 and n[o] > 0:
                    cols[u, o, b] = len(cols)
                    h.addVar(0, inf)
                    h.changeColCost(cols[u, o, b], off.egress[b])

    def row(lo: float, hi: float, terms: list[tuple[int, float]]) -> None:
        h.addRow(lo, hi, len(terms), [c for c, _ in terms], [v for _, v in terms])

    for u, d in p.demand.items():
        for b in range(nb):
            terms = [(c, 1.0) for (u2, _, b2), c in cols.items() if u2 == u and b2 == b]
            if not terms:
                return None
            row(d[b], d[b], terms)
    for o, off in enumerate(p.offerings):
        terms = [(c, 1 / off.mu[b]) for (_, o2, b), c in cols.items() if o2 == o]
        if terms:
            row(-inf, n[o], terms)
    groups = [(p.max_spot_share, lambda off: off.spot)]
    groups += [
        (p.max_region_share, lambda off, loc=loc: off.location == loc)
        for loc in {o.location for o in p.offerings}
    ]
    groups += [
        (p.max_cloud_share, lambda off, c=c: off.cloud == c) for c in {o.cloud for o in p.offerings}
    ]
    for share, member in groups:
        terms = [(c, 1.0) for (_, o, _), c in cols.items() if member(p.offerings[o])]
        if share < 1 and terms:
            row(-inf, share * total, terms)
    spot = [(c, p.offerings[o].location) for (_, o, _), c in cols.items() if p.offerings[o].spot]
    for loc in {at for _, at in spot} if p.spot_spread > 1 else ():
        row(-inf, 0, [(c, (at == loc) - 1 / p.spot_spread) for c, at in spot])
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        return None
    return h.getInfo().objective_function_value


def brute_force(p: Problem) -> float | None:
    """Every replica-count vector, cheapest first. Replicas count (also towards min_replicas)
    only where some user can reach them."""
    total = p.total_demand
    bounds = []
    for off in p.offerings:
        need = sum(math.ceil(total / m) for m in off.mu if m > 0)
        reachable = any(off.location in r for r in p.reach.values())
        bounds.append(range(max(need, p.min_replicas) + 1 if reachable else 1))
    best = None

    def cost(n: tuple[int, ...]) -> float:  # with a warm start: new replicas' launch costs
        launches = sum(p.launch_cost[o] * max(0, c - p.running.get(o, 0))
                       for o, c in enumerate(n)) if p.launch_cost else 0.0  # fmt: skip
        return sum(c * o.price for c, o in zip(n, p.offerings, strict=True)) + launches

    for n in sorted(itertools.product(*bounds), key=cost):
        price = sum(c * o.price for c, o in zip(n, p.offerings, strict=True))
        if best is not None and cost(n) >= best:
            break
        if p.budget is not None and price > p.budget + 1e-9:
            continue
        if sum(n) < p.min_replicas or any(
            sum(c * o.mu[b] for c, o in zip(n, p.offerings, strict=True))
            < sum(d[b] for d in p.demand.values()) - 1e-9
            for b in range(p.num_classes)
        ):  # cheap necessary condition before the LP
            continue
        eg = _lp_egress(p, n)
        if eg is not None and p.budget is not None and price + eg > p.budget + 1e-9:
            continue  # the budget covers egress too (the least egress these counts allow)
        if eg is not None and (best is None or cost(n) + eg < best):
            best = cost(n) + eg
    return best


def _solved_as_brute_force(p: Problem) -> Solution | None:
    """`solve(p)`, asserted to reach brute force's optimum (or to find none where brute force
    finds none: then None)."""
    expect = brute_force(p)
    sol = solve(p, gap_rel=1e-9)
    if expect is None:
        assert sol.status == "infeasible"
        return None
    assert sol.status == "optimal", sol
    assert sol.cost == pytest.approx(expect, rel=1e-6, abs=1e-6)
    return sol


@pytest.mark.parametrize("seed", range(100))
def test_equals_brute_force(seed: int) -> None:
    p = _random_problem(random.Random(seed))
    sol = _solved_as_brute_force(p)
    if sol is None:
        return
    # the solution itself is consistent: demand met, capacity respected
    for u, d in p.demand.items():
        for b, rate in enumerate(d):
            served = sum(v for (u2, _, b2), v in sol.flows.items() if u2 == u and b2 == b)
            assert served == pytest.approx(rate, abs=1e-6)
    for o, cnt in sol.counts.items():
        load = sum(v / p.offerings[o].mu[b] for (o2, b), v in sol.rates.items() if o2 == o)
        assert load <= cnt + 1e-6


def _off(loc: str, price: float, mu: tuple[float, ...], spot: bool = False) -> OfferingClass:
    return OfferingClass(
        (loc, price, spot), loc.split("/")[0], loc, price, spot, mu, (0.0,) * len(mu)
    )


def test_prune_drops_dominated_and_useless() -> None:
    offs = [
        _off("aws/a", 2.0, (2.0,)),
        _off("aws/a", 3.0, (1.0,)),  # dominated: dearer, slower, same place
        _off("aws/a", 3.0, (5.0,)),  # kept: dearer but faster
        _off("aws/far", 1.0, (9.0,)),  # useless: no user reaches it
        _off("aws/a", 1.0, (0.0,)),  # useless: serves nothing
    ]
    p = Problem(offs, {"u": (4.0,)}, {"u": frozenset({"aws/a"})})
    assert prune(p) == [0, 2]


def test_split_into_geographic_components() -> None:
    offs = [_off("aws/us", 1.0, (1.0,)), _off("aws/eu", 1.0, (1.0,)), _off("gcp/eu", 2.0, (1.0,))]
    p = Problem(offs, {"us": (1.5,), "eu": (2.5,)},
                {"us": frozenset({"aws/us"}), "eu": frozenset({"aws/eu", "gcp/eu"})})  # fmt: skip
    comps = components(p, prune(p))
    assert sorted(sorted(u) for u, _ in comps) == [["eu"], ["us"]]
    sol = solve(p)
    assert sol.num_components == 2
    assert sol.cost == pytest.approx(2 + 3)
    assert sol.status == "optimal" and sol.gap == pytest.approx(0, abs=1e-4)


def test_infeasible_when_no_location_reachable() -> None:
    p = Problem([_off("aws/us", 1.0, (1.0,))], {"eu": (1.0,)}, {"eu": frozenset({"aws/eu"})})
    assert solve(p).status == "infeasible"


def test_min_replicas_spread_over_components_is_not_per_component() -> None:
    offs = [_off("aws/us", 1.0, (1.0,)), _off("aws/eu", 1.0, (1.0,))]
    p = Problem(offs, {"us": (0.5,), "eu": (0.5,)},
                {"us": frozenset({"aws/us"}), "eu": frozenset({"aws/eu"})}, min_replicas=2)  # fmt: skip
    sol = solve(p)
    assert sol.num_components == 2 and sol.cost == pytest.approx(2.0)
    assert sol.counts == {0: 1, 1: 1}


def test_aggregation_collapses_interchangeable_offerings() -> None:
    # same place, capacity and egress at three prices: one variable, the cheapest
    offs = [_off("aws/a", 3.0, (2.0, 1.0)), _off("aws/a", 2.5, (2.0, 1.0)),
            _off("aws/a", 2.5, (2.0, 1.0)), _off("aws/a", 4.0, (3.0, 2.0))]  # fmt: skip
    p = Problem(offs, {"u": (3.0, 1.0)}, {"u": frozenset({"aws/a"})})
    stats = Reduction()
    assert prune(p, stats) == [1, 3]
    assert stats.useful == 4 and stats.aggregated == 2
    assert solve(p).cost == pytest.approx(brute_force(p))


def test_k_copy_dominance_drops_a_big_instance_that_small_ones_beat() -> None:
    small = _off("aws/a", 1.0, (1.0,))
    dear_big = _off("aws/a", 8.5, (8.0,))  # 8 smalls cost 8 and carry as much
    cheap_big = _off("aws/a", 7.0, (8.0,))  # cheaper per req/s than the small one: kept
    p = Problem([small, dear_big, cheap_big], {"u": (20.0,)}, {"u": frozenset({"aws/a"})})
    assert prune(p) == [0, 2]
    two = Problem([small, dear_big], {"u": (20.0,)}, {"u": frozenset({"aws/a"})})
    assert prune(two) == [0]
    assert prune(two, multi_copy=False) == [0, 1]
    assert solve(p).cost == pytest.approx(brute_force(p))
    # when the demand is small, one copy of anything is enough ("saturated"): k = 1
    q = Problem([small, _off("aws/a", 1.2, (8.0,))], {"u": (0.9,)}, {"u": frozenset({"aws/a"})})
    assert prune(q) == [0]


def test_saturated_offering_dominates_a_dearer_one_whatever_its_capacity() -> None:
    offs = [_off("aws/a", 2.0, (50.0, 40.0)), _off("aws/a", 3.0, (90.0, 80.0))]
    p = Problem(offs, {"u": (3.0, 2.0)}, {"u": frozenset({"aws/a"})})
    assert prune(p) == [0]
    assert prune(p, multi_copy=False) == [0, 1]


def test_dominance_respects_share_groups() -> None:
    # with a spot share, an on-demand offering is never dropped for a spot one
    offs = [_off("aws/a", 1.0, (2.0,), spot=True), _off("aws/a", 3.0, (2.0,))]
    p = Problem(offs, {"u": (3.0,)}, {"u": frozenset({"aws/a"})}, max_spot_share=0.5)
    assert prune(p) == [0, 1]
    assert solve(p).cost == pytest.approx(brute_force(p))


@pytest.mark.parametrize("seed", range(40))
def test_each_reduction_keeps_the_optimum(seed: int) -> None:
    """Turning off every reduction and tightening row, or building through pulp, gives the
    same optimal cost."""
    p = _random_problem(random.Random(1000 + seed))
    fast = solve(p, options=Options(gap_rel=1e-9))
    plain = solve(p, options=Options(gap_rel=1e-9, split=False, tighten=False, multi_copy=False,
                                     warm_start=False, far_prune=False))  # fmt: skip
    via_pulp = solve(p, options=Options(gap_rel=1e-9, backend="pulp"))
    assert fast.status == plain.status == via_pulp.status
    if fast.status != "infeasible":
        assert fast.cost == pytest.approx(plain.cost, rel=1e-6, abs=1e-6)
        assert fast.cost == pytest.approx(via_pulp.cost, rel=1e-6, abs=1e-6)


def test_cbc_fallback_agrees() -> None:
    p = _random_problem(random.Random(7))
    cbc = solve(p, solver="cbc", gap_rel=1e-9)
    highs = solve(p, gap_rel=1e-9)
    assert cbc.status != "infeasible" and cbc.solver == "CBC (pulp)"
    assert cbc.cost == pytest.approx(highs.cost, rel=1e-6)


@pytest.mark.parametrize("support_mip", [True, False])
def test_warm_start_outside_the_optimum_still_optimal(support_mip: bool) -> None:
    """Without tightening rows (and without k-copy pruning, which would drop the big one) the
    LP relaxation uses only the big offering (cheapest per req/s), so the warm start (rounded,
    or the MILP on that support) costs $10; the solve must still reach the $3 optimum that
    uses the other offering."""
    offs = [_off("aws/a", 10.0, (10.0,)), _off("aws/a", 3.0, (1.0,))]
    p = Problem(offs, {"u": (1.0,)}, {"u": frozenset({"aws/a"})})
    s = solve(p, options=Options(tighten=False, multi_copy=False, support_mip=support_mip,
                                     gap_rel=1e-9))  # fmt: skip
    assert s.status == "optimal" and s.counts == {1: 1}
    assert s.cost == pytest.approx(3.0) == pytest.approx(brute_force(p))


@pytest.mark.parametrize("seed", range(10))
def test_relaxation_is_a_lower_bound(seed: int) -> None:
    """Options(relaxation=True) solves the LP relaxation: never dearer than the MILP, and
    infeasible only where the MILP is."""
    p = _random_problem(random.Random(2000 + seed))
    lp = solve(p, options=Options(relaxation=True))
    milp = solve(p, options=Options(gap_rel=1e-9))
    if lp.status == "infeasible":
        assert milp.status == "infeasible"
    elif milp.status != "infeasible":
        assert lp.cost <= milp.cost + 1e-6
        assert all(n >= 1 for n in lp.counts.values())


@pytest.mark.parametrize("seed", range(60))
def test_spot_spread_equals_brute_force(seed: int) -> None:
    """With `spot_spread` N no location carries more than 1/N of the spot traffic; the
    pruned, split and tightened MILP still finds brute force's optimum."""
    rng = random.Random(5000 + seed)
    p = dataclasses.replace(_random_problem(rng), spot_spread=rng.choice([2, 3]))
    sol = _solved_as_brute_force(p)
    if sol is None:
        return
    spot: dict[str, float] = {}
    for (i, _), r in sol.rates.items():
        if p.offerings[i].spot:
            spot[p.offerings[i].location] = spot.get(p.offerings[i].location, 0.0) + r
    for r in spot.values():
        assert r <= sum(spot.values()) / p.spot_spread + 1e-6


def test_spot_spread_puts_spot_in_two_locations_or_none() -> None:
    """Spot at $1 in two regions and on-demand at $3: spread 2 serves half the spot traffic
    in each region; with only one spot region, spread 2 leaves spot unused."""
    offs = [_off("aws/a", 1.0, (2.0,), spot=True), _off("aws/b", 1.0, (2.0,), spot=True),
            _off("aws/a", 3.0, (2.0,))]  # fmt: skip
    reach = {"u": frozenset({"aws/a", "aws/b"})}
    p = Problem(offs, {"u": (3.0,)}, reach, spot_spread=2)
    s = solve(p, options=Options(gap_rel=1e-9))
    assert s.status == "optimal" and s.counts == {0: 1, 1: 1}
    assert s.rates[0, 0] == pytest.approx(1.5) and s.rates[1, 0] == pytest.approx(1.5)
    one = Problem(offs[::2], {"u": (3.0,)}, reach, spot_spread=2)
    s = solve(one, options=Options(gap_rel=1e-9))
    assert s.status == "optimal" and s.counts == {1: 2} and s.cost == pytest.approx(6.0)
    assert solve(dataclasses.replace(one, spot_spread=1)).cost == pytest.approx(2.0)


def _many_locations(rng: random.Random) -> Problem:
    """A few instance types copied at 6-10 locations (jittered prices) under a region share,
    where dominance across locations has something to drop."""
    locs = [f"{c}/r{i}" for c in ("aws", "gcp") for i in range(rng.randint(3, 5))]
    nb = rng.randint(1, 2)
    types = [(round(rng.uniform(1, 8), 2), tuple(round(rng.uniform(0.5, 3.0), 2) for _ in range(nb)))
             for _ in range(rng.randint(1, 3))]  # fmt: skip
    offs = []
    for loc in locs:
        for k, (price, mu) in enumerate(types):
            for spot in (False, True) if rng.random() < 0.5 else (False,):
                f = rng.uniform(0.9, 1.1) * (0.5 if spot else 1.0)
                offs.append(OfferingClass((loc, k, spot), loc.split("/")[0], loc,
                                          round(price * f, 3), spot, mu,
                                          (round(rng.uniform(0, 0.05), 3),) * nb))  # fmt: skip
    users = [f"u{i}" for i in range(rng.randint(1, 2))]
    demand = {u: tuple(round(rng.uniform(0.3, 1.5), 2) for _ in range(nb)) for u in users}
    reach = {u: frozenset(rng.sample(locs, rng.randint(len(locs) // 2, len(locs)))) for u in users}
    return Problem(offs, demand, reach, min_replicas=rng.choice([0, 2]),
                   max_spot_share=rng.choice([1.0, 0.5]),
                   max_region_share=rng.choice([0.3, 0.5, 0.7]),
                   max_cloud_share=rng.choice([1.0, 0.8]),
                   budget=rng.choice([None, 60.0]))  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_dominance_across_locations_keeps_the_optimum(seed: int) -> None:
    """Under a region share, dropping offerings dominated at more other locations than an
    optimal placement has replicas leaves the optimum as the unreduced MILP finds it."""
    p = _many_locations(random.Random(3000 + seed))
    stats = Reduction()
    prune(p, stats)
    fast = solve(p, options=Options(gap_rel=1e-9))
    plain = solve(p, options=Options(gap_rel=1e-9, split=False, tighten=False, multi_copy=False,
                                     warm_start=False, far_prune=False))  # fmt: skip
    assert fast.status == plain.status
    if fast.status != "infeasible":
        assert fast.cost == pytest.approx(plain.cost, rel=1e-6, abs=1e-6)
        assert fast.reduction is not None and fast.reduction.far <= stats.multi_copy


def test_dominance_across_locations_drops_the_dearer_copies() -> None:
    """One instance type at six locations, half the traffic at most per location: two
    replicas are needed and cost ~$2.01/h, so no placement has more than two replicas
    ($1 each at least); every copy with cheaper copies at two or more other locations goes."""
    offs = [_off(f"aws/r{k}", 1.0 + 0.01 * k, (1.0,)) for k in range(6)]
    p = Problem(offs, {"u": (1.0,)}, {"u": frozenset(o.location for o in offs)},
                max_region_share=0.5)  # fmt: skip
    s = solve(p, options=Options(gap_rel=1e-9))
    assert s.reduction is not None and s.reduction.multi_copy == 6 and s.reduction.far == 2
    assert s.status == "optimal" and s.counts == {0: 1, 1: 1}
    assert s.cost == pytest.approx(2.01) == pytest.approx(brute_force(p))


def _warm(p: Problem, rng: random.Random) -> Problem:
    running = {o: rng.randint(1, 3) for o in range(len(p.offerings)) if rng.random() < 0.5}
    launch = tuple(round(o.price * rng.choice([0.1, 0.5, 1.5]), 3) for o in p.offerings)
    return dataclasses.replace(p, running=running, launch_cost=launch)


@pytest.mark.parametrize("seed", range(60))
def test_a_warm_start_equals_brute_force_with_its_launch_costs(seed: int) -> None:
    rng = random.Random(seed)
    p = _warm(_random_problem(rng), rng)
    sol = _solved_as_brute_force(p)
    if sol is None:
        return
    new = sum(p.launch_cost[o] * max(0, n - p.running.get(o, 0)) for o, n in sol.counts.items())
    assert sol.launch_cost == pytest.approx(new)


def test_a_warm_start_keeps_what_runs_unless_a_change_pays() -> None:
    # B is 10% cheaper per req/s than the running A; starting B costs half its price: A stays
    a, b = _off("aws/r", 1.0, (2.0,)), _off("aws/r", 0.9, (2.0,))
    cold = Problem([a, b], {"u": (3.5,)}, {"u": frozenset({"aws/r"})})
    assert solve(cold).counts == {1: 2}
    warm = dataclasses.replace(cold, running={0: 2}, launch_cost=(0.5, 0.45))
    s = solve(warm)
    assert s.counts == {0: 2} and s.launch_cost == 0.0 and s.cost == pytest.approx(2.0)
    # twice the rate: the running pair stays and the cheaper B is added, no reshuffle
    more = dataclasses.replace(warm, demand={"u": (7.5,)})
    s = solve(more)
    assert s.counts == {0: 2, 1: 2} and s.launch_cost == pytest.approx(0.9)
    # when B is far cheaper, the change pays for itself at once
    far = dataclasses.replace(
        warm, offerings=[a, _off("aws/r", 0.3, (2.0,))], launch_cost=(0.5, 0.15)
    )
    assert solve(far).counts == {1: 2}
