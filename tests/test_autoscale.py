"""The autoscaling policy on its own: load in, targets and reasons out (no processes)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from skybroker.autoscale import (
    Autoscaler,
    Load,
    Policy,
    capacity,
    changes,
    merge_targets,
    total_replicas,
)
from skybroker.autoscale_fit import Fit
from skybroker.scaling import Scaling
from skybroker.spec import SpecError, SpotPolicy, parse_spec
from skybroker.targets import load_planner
from skybroker.targets import solve as targets_solve


def target(region: str, n: int, cap: float = 3.0, price: float = 0.44, gpu: str = "A40"):
    return {"key": ["aws", region, f"{gpu}.x", False], "gpu": gpu, "replicas": n,
            "capacity_rps": cap, "price_per_hour": price}  # fmt: skip


def policy(**kw) -> Policy:
    return Policy(**({"min_replicas": 1, "max_replicas": 6, "downscale_delay_s": 60} | kw))


def test_scales_up_at_once_when_the_rate_exceeds_what_is_served_within_slo() -> None:
    a = Autoscaler(policy())
    d = a.decide(Load(rate=4.1), [target("us-east-1", 1)], now=0.0)
    assert d.changed and d.kind == "up"
    assert d.targets[0]["replicas"] == 2  # 2 x 3.0 x 0.8 = 4.8 >= 4.1
    assert d.reasons == ["rate 4.10 req/s > 2.40 served within SLO: +1 A40 aws/us-east-1"]


def test_upscale_delay_waits_then_scales() -> None:
    a = Autoscaler(policy(upscale_delay_s=10))
    ts = [target("us-east-1", 1)]
    assert not a.decide(Load(rate=5), ts, now=0.0).changed
    assert "up in 5s" in a.decide(Load(rate=5), ts, now=5.0).reasons[0]
    assert a.decide(Load(rate=5), ts, now=10.0).changed


def test_scales_down_only_after_the_downscale_delay_and_resets_on_a_burst() -> None:
    a = Autoscaler(policy(downscale_delay_s=60))
    ts = [target("us-east-1", 3)]
    assert not a.decide(Load(rate=1.0), ts, now=0.0).changed
    assert not a.decide(Load(rate=1.0), ts, now=30.0).changed
    assert not a.decide(Load(rate=6.0), ts, now=40.0).changed  # busy again: the clock resets
    assert not a.decide(Load(rate=1.0), ts, now=50.0).changed
    assert not a.decide(Load(rate=1.0), ts, now=100.0).changed
    d = a.decide(Load(rate=1.0), ts, now=111.0)
    assert d.changed and d.kind == "down" and total_replicas(d.targets) == 1
    assert d.reasons[0].endswith("within SLO: -2 A40 aws/us-east-1")


def test_min_and_max_replicas_bound_the_fleet() -> None:
    a = Autoscaler(policy(min_replicas=2, max_replicas=3, downscale_delay_s=0))
    d = a.decide(Load(rate=100), [target("us-east-1", 2)], now=0)
    assert total_replicas(d.targets) == 3
    d = a.decide(Load(rate=0.0), [target("us-east-1", 3)], now=1)
    assert total_replicas(d.targets) == 2
    held = a.decide(Load(rate=100), [target("us-east-1", 3)], now=2)
    assert not held.changed and "at max_replicas 3" in held.reasons[0]


def test_in_flight_beyond_what_the_slo_allows_is_a_risk_too() -> None:
    a = Autoscaler(policy(ttft_s=1.0, tpot_s=0.05, planned_output=20))
    # served within SLO 2.4 req/s x (1 + 20 x 0.05) s = 4.8 in flight at most
    d = a.decide(Load(rate=1.0, output_tokens=20, input_tokens=512, in_flight={"r": 30}),
                 [target("us-east-1", 1)], now=0)  # fmt: skip
    assert d.changed and "30 requests in flight" in d.reasons[0]


def test_a_longer_mix_lowers_the_capacity_it_is_judged_by() -> None:
    a = Autoscaler(policy(planned_input=512, planned_output=256))
    ts = [target("us-east-1", 2)]  # 4.8 req/s within SLO for the planned mix
    assert not a.decide(Load(rate=4.0, input_tokens=512, output_tokens=256), ts, 0).changed
    d = a.decide(Load(rate=4.0, input_tokens=512, output_tokens=512), ts, 1)
    assert d.changed and total_replicas(d.targets) == 4


def test_replan_wins_only_when_it_pays_for_the_switch() -> None:
    big = target("us-east-1", 1, cap=12.0, price=1.39, gpu="A100")

    def replan(need: float, _in: float, _out: float, _running=None):
        return [dict(big, replicas=max(1, int(-(-need // 12))))]

    # 6 req/s: stepping A40s needs 3 x 0.44 = 1.32/h; the A100 1.39/h: stay on A40s
    a = Autoscaler(policy(max_replicas=20), replan=replan)
    d = a.decide(Load(rate=6.0), [target("us-east-1", 1)], now=0)
    assert [t["gpu"] for t in d.targets] == ["A40"] and total_replicas(d.targets) == 3
    # 18 req/s: 8 A40s (3.52/h) vs 2 A100s (2.78/h + switching): the re-plan
    d = a.decide(Load(rate=18.0), [target("us-east-1", 1)], now=1)
    assert d.kind == "replan" and "-1 A40 aws/us-east-1" in d.reasons[0]
    assert "+2 A100" in d.reasons[0] and d.reasons[0].endswith(
        "A40 aws/us-east-1 drain once the new serve"
    )
    # make before break: the A40 serves until the A100s do, a startup later
    assert sorted((t["gpu"], t["replicas"]) for t in d.targets) == [("A100", 2), ("A40", 1)]
    held = a.decide(Load(rate=18.0), d.targets, now=100)
    assert not held.changed and held.reasons == ["replacements for 1 A40 aws/us-east-1 starting"]
    done = a.decide(Load(rate=18.0), d.targets, now=301)
    assert done.changed and {t["gpu"] for t in done.targets} == {"A100"}
    assert capacity(done.targets) * 0.8 >= 18.0


def test_merge_keeps_indices_and_zeroes_what_the_new_plan_drops() -> None:
    old = [target("a", 2), target("b", 1)]
    new = [target("b", 3), target("c", 1)]
    merged = merge_targets(old, new)
    assert [(t["key"][1], t["replicas"]) for t in merged] == [("a", 0), ("b", 3), ("c", 1)]
    assert changes(old, new) == ["+2 A40 aws/b", "+1 A40 aws/c", "-2 A40 aws/a"]


BASE = {"name": "x", "model": "m", "workload": {"rate": 1}}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"autoscale": {"min_replicas": 3, "max_replicas": 2}}, "min_replicas 3 > max_replicas 2"),
        ({"autoscale": {"headroom": 1.0}}, "autoscale.headroom"),
        ({"autoscale": {"max_replicas": 1}, "constraints": {"min_replicas": 2}},
         "autoscale.max_replicas 1 < constraints.min_replicas 2"),
        ({"spot": {"fallback": "on_demand"}}, "constraints.spot is never"),
        ({"spot": {"fallback": "sometimes"}, "constraints": {"spot": "allowed"}}, "spot.fallback"),
        ({"spot": {"spread": 0}, "constraints": {"spot": "allowed"}}, "spot.spread"),
        ({"workload": {"rate": 1, "schedule": [1] * 23}}, "24 hourly rates"),
        ({"workload": {"rate": 1, "schedule": {24: 1}}}, "hours of day are 0-23"),
        ({"workload": {"rate": 1, "schedule": {3: 0}}}, "must be a number > 0"),
    ],
)  # fmt: skip
def test_bad_scaling_specs_say_what_is_wrong(extra: dict, message: str) -> None:
    with pytest.raises(SpecError, match=message):
        parse_spec(BASE | extra)


def test_a_scaling_spec_parses() -> None:
    spec = parse_spec(BASE | {"autoscale": {"min_replicas": 1, "max_replicas": 3},
                              "constraints": {"spot": "allowed"}, "spot": {"spread": 2},
                              "workload": {"rate": 1, "schedule": [1.0] * 24}})  # fmt: skip
    assert spec.autoscale.headroom == 0.2 and spec.spot.fallback == "on_demand"
    assert Policy.from_spec(spec).max_replicas == 3


def test_measured_ttft_over_the_slo_adds_one_replica_at_a_time() -> None:
    a = Autoscaler(policy(ttft_s=0.5, percentile=90))
    ts = [target("us-east-1", 1, cap=100.0)]  # planned capacity is no constraint here
    d = a.decide(Load(rate=1.0, ttft_s=0.9), ts, now=0)
    assert d.changed and total_replicas(d.targets) == 2
    assert d.reasons[0] == "TTFT p90 0.90s > 0.50s SLO at 1.00 req/s: +1 A40 aws/us-east-1"
    held = a.decide(Load(rate=1.0, ttft_s=0.9, starting=1), d.targets, now=1)
    assert not held.changed and "waiting for 1 starting" in held.reasons[0]
    # near the SLO (within the headroom) no scale-down starts; well within it, one does
    assert not a.decide(Load(rate=1.0, ttft_s=0.45), d.targets, now=2).reasons
    assert "down in 60s" in a.decide(Load(rate=1.0, ttft_s=0.1), d.targets, now=3).reasons[0]


def test_free_replicas_scale_down_too() -> None:
    a = Autoscaler(policy(downscale_delay_s=0))
    d = a.decide(Load(rate=0.0), [target("local", 3, cap=10.0, price=0.0)], now=0)
    assert d.changed and total_replicas(d.targets) == 1 and d.kind == "down"


def engines(waiting: int, kv: float = 0.5, n: int = 1) -> dict:
    return {f"r{i}": {"num_requests_waiting": waiting / n, "kv_cache_usage_perc": kv}
            for i in range(n)}  # fmt: skip


def test_a_queue_that_does_not_shrink_scales_up_one_step() -> None:
    a = Autoscaler(policy())
    ts = [target("us-east-1", 2, cap=100.0)]  # the rate is far within planned capacity
    assert not a.decide(Load(rate=1.0, engines=engines(4, n=2)), ts, now=0).changed  # first look
    d = a.decide(Load(rate=1.0, engines=engines(6, n=2)), ts, now=5)
    assert d.changed and total_replicas(d.targets) == 3
    assert d.reasons[0] == "6 requests queued on 2 replicas, not shrinking: +1 A40 aws/us-east-1"
    a = Autoscaler(policy())  # a queue that drains is no risk
    assert not a.decide(Load(rate=1.0, engines=engines(6, n=2)), ts, now=0).changed
    assert not a.decide(Load(rate=1.0, engines=engines(3, n=2)), ts, now=5).changed


def test_kv_cache_near_full_scales_up_at_once_and_blocks_a_scale_down() -> None:
    a = Autoscaler(policy(downscale_delay_s=0))
    ts = [target("us-east-1", 2, cap=100.0)]
    d = a.decide(Load(rate=1.0, engines=engines(0, kv=0.95, n=2)), ts, now=0)
    assert d.changed and d.reasons[0].startswith("KV cache 95% full (>= 90%)")
    # the rate alone would let 3 go to 1, but the engines are busy: hold
    three = d.targets
    assert not a.decide(Load(rate=1.0, engines=engines(0, kv=0.8, n=3)), three, now=1).changed
    assert not a.decide(Load(rate=1.0, engines=engines(2, kv=0.1, n=3)), three, now=2).changed
    d = a.decide(Load(rate=1.0, engines=engines(0, kv=0.1, n=3)), three, now=3)
    assert d.changed and total_replicas(d.targets) == 1


def test_the_schedule_scales_up_a_startup_before_its_hour_and_holds_through_it() -> None:
    a = Autoscaler(policy(max_replicas=20, schedule={14: 18.0}))  # startup 300 s
    ts = [target("us-east-1", 2)]
    assert not a.decide(Load(rate=4.0), ts, now=13 * 3600 + 50 * 60).changed  # 10 min ahead
    d = a.decide(Load(rate=4.0), ts, now=13 * 3600 + 56 * 60)
    assert d.changed and capacity(d.targets) * 0.8 >= 18.0
    assert d.reasons[0].startswith("schedule 18.00 req/s at 14:00 > 4.80 served within SLO: +6 ")
    # the observed rate is lower all hour, but the schedule keeps the capacity until 15:00
    a.policy.downscale_delay_s = 0
    assert not a.decide(Load(rate=4.0), d.targets, now=14 * 3600 + 30 * 60).changed
    assert a.decide(Load(rate=4.0), d.targets, now=15 * 3600 + 1).changed


def test_a_blocked_offering_is_moved_off_at_once_and_never_grown() -> None:
    spot = dict(target("eu-south-2", 2, cap=5.0, price=0.4, gpu="L40S"), key=["aws", "eu-south-2", "g6e", True])  # fmt: skip
    ts = [target("us-east-1", 1), spot]  # 13 req/s planned
    a = Autoscaler(policy(max_replicas=20))
    blocked = frozenset({("aws", "eu-south-2", "g6e", True)})
    d = a.decide(Load(rate=6.0), ts, now=0, blocked=blocked)
    assert d.changed and d.kind == "replan"
    assert d.reasons[0] == ("L40S aws/eu-south-2 spot has no capacity: +2 A40 aws/us-east-1, "
                            "-2 L40S aws/eu-south-2 spot; 2 L40S aws/eu-south-2 spot drain "
                            "once the new serve")  # fmt: skip
    live = [t for t in d.targets if not t["key"][3]]
    assert capacity(live) * 0.8 >= 6.0 and total_replicas(d.targets) == 5
    assert not a.decide(Load(rate=6.0), d.targets, now=100, blocked=blocked).changed
    done = a.decide(Load(rate=6.0), d.targets, now=300, blocked=blocked)  # a startup later
    assert done.changed and done.targets == live
    assert (
        done.reasons[0]
        == "replacements for 2 L40S aws/eu-south-2 spot ready: -2 L40S aws/eu-south-2 spot"
    )


# -- steps under the spec's constraints (RTT reach, spot and region shares) -----------------


def spot_target(region: str, n: int, cap: float = 4.0, price: float = 0.42):
    return dict(target(region, n, cap, price, "L40S"), key=["aws", region, "g6e.x", True])


def test_a_step_up_keeps_spot_within_its_share() -> None:
    ts = [target("us-east-1", 1, cap=3.0, price=0.88), spot_target("us-east-1", 1)]
    fit = Fit({"us": 1.0}, max_spot_share=0.5)
    a = Autoscaler(policy(max_replicas=20), fit=fit)
    d = a.decide(Load(rate=8.0), ts, now=0)  # 10 req/s with the headroom free
    od = sum(t["replicas"] * t["capacity_rps"] for t in d.targets if not t["key"][3])
    spot = sum(t["replicas"] * t["capacity_rps"] for t in d.targets if t["key"][3])
    assert od >= 5.0 and fit.servable(d.targets) >= 10.0 and fit.shortfall(d.targets, 10.0) == 0
    assert spot <= 8.0  # one spot replica more than the cap needs, at most
    # the same placement without the cap: spot (cheapest per req/s) takes the whole step
    d = Autoscaler(policy(max_replicas=20)).decide(Load(rate=8.0), ts, now=0)
    assert [t["replicas"] for t in d.targets] == [1, 2]


def test_a_step_adds_where_the_users_short_of_capacity_are() -> None:
    # eu-west replicas are cheaper per req/s, but only us-east ones reach the US users
    us, eu = target("us-east-1", 1, cap=3.0, price=0.88), target("eu-west-1", 1, cap=4.0, price=0.5)
    fit = Fit({"us": 0.6, "eu": 0.4}, {"aws/us-east-1": frozenset({"us"}),
                                        "aws/eu-west-1": frozenset({"eu"})})  # fmt: skip
    assert fit.servable([us, eu]) == pytest.approx(5.0)  # the US users' 3 req/s bind
    a = Autoscaler(policy(max_replicas=20), fit=fit)
    d = a.decide(Load(rate=8.0), [us, eu], now=0)  # 10 req/s: 6 for the US, 4 for the EU
    assert [t["replicas"] for t in d.targets] == [2, 1]
    assert d.reasons[0] == "rate 8.00 req/s > 4.00 served within SLO: +1 A40 aws/us-east-1"
    # without the reach, the cheaper EU replicas would be added and the US users left short
    d = Autoscaler(policy(max_replicas=20)).decide(Load(rate=8.0), [us, eu], now=0)
    assert [t["replicas"] for t in d.targets] == [1, 2]


def test_a_step_down_keeps_every_user_region_and_the_region_share() -> None:
    ts = [target("us-east-1", 4), target("eu-west-1", 4)]  # 3 req/s each
    fit = Fit({"us": 0.5, "eu": 0.5}, max_region_share=0.6)  # both reach every user
    a = Autoscaler(policy(downscale_delay_s=0), fit=fit)
    d = a.decide(Load(rate=4.0), ts, now=0)  # 5 req/s: at most 3 in one region
    assert d.kind == "down" and fit.shortfall(d.targets, 5.0) == 0
    assert sorted(t["replicas"] for t in d.targets) == [1, 1]  # 3 + 3 >= 5, 3 <= 0.6 x 5
    fit = Fit({"us": 0.5, "eu": 0.5}, max_region_share=0.55)
    d = Autoscaler(policy(downscale_delay_s=0), fit=fit).decide(Load(rate=4.0), ts, now=0)
    assert sorted(t["replicas"] for t in d.targets) == [1, 1]
    assert fit.servable(d.targets) == pytest.approx(6.0)
    # a region share of 0.4 cannot be met by two regions at all: nothing is servable
    assert Fit({"us": 1.0}, max_region_share=0.4).servable(ts) == 0.0


def test_the_fit_counts_spot_only_as_spread_as_spot_spread_asks() -> None:
    """spot.spread 2: no region carries more than half the spot traffic, so spot replicas in
    one region serve nothing and a step up adds spot in a second one."""
    od, spot = target("us-east-1", 1, cap=3.0, price=0.88), spot_target("us-east-1", 2)
    assert Fit({"us": 1.0}).servable([od, spot]) == pytest.approx(11.0)
    fit = Fit({"us": 1.0}, spot_spread=2)
    assert fit.servable([od, spot]) == pytest.approx(3.0)
    both = [od, spot, spot_target("us-west-2", 1)]
    assert fit.servable(both) == pytest.approx(3.0 + 4.0 + 4.0)  # 4 + 4 spot, 4 idle
    # 12.5 req/s with the headroom free: one more spot replica in us-east would serve nothing
    d = Autoscaler(policy(max_replicas=20), fit=fit).decide(Load(rate=10.0), both, now=0)
    assert [t["replicas"] for t in d.targets] == [1, 2, 2]
    assert fit.shortfall(d.targets, 12.5) == 0


def test_the_fit_of_a_spec_knows_its_users_reach() -> None:
    spec = parse_spec(yaml_spec("examples/chat-8b-us-eu.yaml") | {"constraints": {
        "clouds": ["aws"], "spot": "allowed", "min_replicas": 2}})  # fmt: skip
    fit = Fit.from_spec(spec)
    assert fit.users == {"us-east": 0.6, "eu-west": 0.4} and fit.max_spot_share == 0.5
    assert fit.spot_spread == 1
    assert Fit.from_spec(spec.model_copy(update={"spot": SpotPolicy(spread=2)})).spot_spread == 2
    assert fit.reach["aws/us-east-1"] == {"us-east"} and fit.reach["aws/eu-west-1"] == {"eu-west"}


def yaml_spec(path: str) -> dict:
    import yaml

    return yaml.safe_load(open(path).read())


# -- the controller's side: warm re-plans, the blocklist, failover sized for the load ------


def test_the_re_plan_is_warm_started_from_what_runs() -> None:
    seen: list = []

    def planner(spec, blocklist=frozenset(), warm=None):
        seen.append((spec.workload.rate, warm))
        raise ValueError("only recording")

    spec = parse_spec(BASE | {"autoscale": {"min_replicas": 1}})
    replan = load_planner(spec, frozenset(), planner, startup_s=600, per_launch=0.1)
    with pytest.raises(ValueError):
        replan(3.0, 0, 0, [dict(target("us-east-1", 2), tensor_parallel=1)])
    (rate, warm), = seen  # fmt: skip
    assert rate == 3.0 and warm.running == {("aws", "us-east-1", "A40.x", False, 1): 2}
    assert warm.launch_cost(0.6) == pytest.approx(0.6 * 600 / 3600 + 0.1)


class FakeStore:
    def __init__(self) -> None:
        self.events: list = []

    def add_event(self, name, kind, message, *a, data=None, **kw) -> None:
        self.events.append((kind, message))


class FakeController:
    """What `Scaling` uses of a controller: the router's load, replicas, scale, the store."""

    def __init__(self, dep, rate: float) -> None:
        self.dep, self.rate, self.store, self.planner = dep, rate, FakeStore(), None
        self.routers = self

    def load(self, name, window):
        return {"rate": self.rate, "input_tokens": 600, "output_tokens": 250}

    def replicas(self, name):
        return []

    def get(self, name):
        return self.dep

    def scale(self, name, i, n):
        self.dep.targets[i] = dict(self.dep.targets[i], replicas=n)
        return self.dep


def local_dep(targets: list, blocklist: list) -> Any:
    spec = {"name": "d", "infra": "local", "model": {"path": "/m"}, "workload": {"rate": 1},
            "autoscale": {"min_replicas": 1, "max_replicas": 6, "downscale_delay_s": 60}}  # fmt: skip
    return SimpleNamespace(name="d", spec=spec, targets=targets, blocklist=blocklist)


def test_tick_passes_the_blocklist_and_failover_sizes_for_the_observed_load() -> None:
    spot = dict(target("eu-south-2", 2), key=["aws", "eu-south-2", "g6e", True])
    dep = local_dep([target("us-east-1", 1), spot], [("aws", "eu-south-2", "g6e", True)])
    c = FakeController(dep, rate=4.0)
    s = Scaling(c, interval_s=0)
    assert s.sizing(dep) is None  # no load seen yet: the spec's rate
    d = s.tick(dep, now=0.0)
    assert d.kind == "replan" and d.reasons[0].startswith("A40 aws/eu-south-2 spot has no capacity")
    assert s.sizing(dep) == (pytest.approx(5.0), 600, 250)  # 4 req/s with 20% free
    assert c.store.events[0][0] == "autoscaled"

    recorded: list = []

    def planner(spec, blocklist=frozenset()):
        recorded.append((spec.workload.rate, spec.constraints.min_replicas, blocklist))
        raise ValueError("nothing left")

    spec = parse_spec(dep.spec)
    with pytest.raises(ValueError, match="nothing left"):
        targets_solve(planner, SimpleNamespace(spec=spec.model_dump()), {("k",)}, s.sizing(dep))
    assert recorded == [(pytest.approx(5.0), 1, frozenset({("k",)}))]


def test_a_deployment_with_a_spot_spread_steps_within_it() -> None:
    dep = local_dep([target("us-east-1", 1)], [])
    s = Scaling(FakeController(dep, rate=1.0), interval_s=0)
    assert s._scaler(dep).fit is None  # plain steps: copies of what runs
    spec = dep.spec | {"constraints": {"spot": "allowed"}, "spot": {"spread": 2}}
    spread = SimpleNamespace(**(vars(dep) | {"spec": spec}))
    s = Scaling(FakeController(spread, rate=1.0), interval_s=0)
    fit = s._scaler(spread).fit
    assert fit is not None and fit.spot_spread == 2


def test_a_re_plan_never_raises_the_capacity_counted_for_what_runs() -> None:
    # the re-plan sends the A40s a lighter mix and plans them for 4 req/s each; the two
    # running were planned (and launched) for 3: they count as 3, so 12 req/s needs 5
    def replan(need: float, _in: float, _out: float, _running=None):
        return [target("us-east-1", max(1, int(-(-need // 4))), cap=4.0)]

    a = Autoscaler(policy(max_replicas=20), replan=replan)
    d = a.decide(Load(rate=12.0), [target("us-east-1", 2)], now=0)  # 15 req/s with headroom
    assert d.targets[0]["capacity_rps"] == 3.0 and total_replicas(d.targets) == 5
    merged = merge_targets([target("us-east-1", 2)], [target("us-east-1", 4, cap=4.0)])
    assert merged[0]["capacity_rps"] == 3.0
    gone = merge_targets([target("us-east-1", 0)], [target("us-east-1", 4, cap=4.0)])
    assert gone[0]["capacity_rps"] == 4.0  # nothing ran there: the new plan's figure


def test_a_spare_single_replica_offering_is_re_planned_away() -> None:
    # one replica each of two offerings: stepping keeps one per offering, but the A40 alone
    # serves the load; the re-plan is asked, and after the delay the A6000 goes
    def replan(need: float, _in: float, _out: float, _running=None):
        return [target("us-east-1", 1)]

    ts = [target("us-east-1", 1), target("us-west-2", 1, cap=4.0, price=0.8, gpu="A6000")]
    a = Autoscaler(policy(downscale_delay_s=60), replan=replan)
    assert "down in 60s" in a.decide(Load(rate=2.0), ts, now=0).reasons[0]
    d = a.decide(Load(rate=2.0), ts, now=60)
    assert d.changed and d.kind == "replan" and [t["gpu"] for t in d.targets] == ["A40"]
