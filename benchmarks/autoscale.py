"""One synthetic day of a diurnal, bursty load with spot preemptions: $ and SLO attainment of
a static peak plan, a SkyServe-style autoscaler and skybroker's autoscaler.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/autoscale.py [--seed 0] [--days 1]

The spec is examples/chat-8b-us-eu.yaml with spot allowed (`constraints.spot: allowed`, so at
most half the rate on spot, and `spot: {fallback: on_demand}`) and `autoscale: {min_replicas:
2, max_replicas: 40, upscale_delay_s: 0, downscale_delay_s: 600, headroom: 0.2}`.

The load: 1-minute steps; a cosine day between 4 req/s (03:00) and 20 req/s (15:00), 5:1;
eight bursts of 10-30 min at 1.3-1.8x; Poisson arrivals. Every policy sees the previous
minute's arrival rate. Capacity is the planner's own model: each replica serves its target's
planned `capacity_rps` (the highest rate at which the SLO's percentile meets TTFT and TPOT,
for the request mix that target was planned for); a minute's requests are within the SLO
while the arrival rate is at most the ready replicas' capacity, else the share capacity/rate
is. Replicas are paid from launch and serve STARTUP_S later; a replica removed is paid one
more minute (its drain). Spot: each running spot replica is preempted with probability
PREEMPT_PER_H per hour; each preemption makes its offering scarce (no spot launches) for
SCARCE_S with probability SCARCE_P. Where spot is scarce, all three stand in on-demand
replicas of the same instance type where that is sold (SkyServe's dynamic_ondemand_fallback),
drained once spot replicas are ready again; skybroker's autoscaler is told the scarce offering
is blocked and moves its replicas to other offerings at once (a re-plan without it, or the
others grown), for the cool-down.

Policies:
- static peak: the plan for the diurnal peak (`workload.rate: 20`), fixed all day.
- static max: the plan for the day's highest minute (bursts included), fixed all day.
- skyserve: the offerings the planner picks for 1 req/s (the cheapest instance type that fits
  and serves the users' regions), each with `target_qps_per_replica` = its capacity for the
  whole mix x (1 - headroom); replicas = ceil(rate x its users' share / target_qps), same
  delays, same min_replicas.
- skybroker: `skybroker.autoscale.Autoscaler` with the planner as its re-plan
  (`skybroker.targets.load_planner` on `skybroker.autoscale.plan_step`'s grid; the solves are
  kept in $SKYBROKER_HOME/autoscale-plans.json across runs, `--fresh` solves them again).
- skybroker+sched: the same with `workload.schedule` set to each hour's peak of the cosine
  (the known curve, bursts unknown).

`--warm` and `--fit` switch on the autoscaler's opt-in parts (`SwitchCost.warm`: the re-plan
warm-started from what runs; `Fit.from_spec`: steps kept feasible under the spec).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("SKYBROKER_HOME", "/tmp/skybroker-bench")  # perf cache shared

import numpy as np
import yaml

from skybroker.autoscale import (
    Autoscaler,
    Load,
    Policy,
    SwitchCost,
    hourly,
    merge_targets,
    plan_step,
)
from skybroker.autoscale_fit import Fit
from skybroker.catalog import load_catalog
from skybroker.spec import parse_spec
from skybroker.targets import load_planner, running_counts, spec_for_load, targets_from_plan

STEP_S = 60.0
STARTUP_S = 300.0
PREEMPT_PER_H = 0.1
SCARCE_P = 0.5
SCARCE_S = 1800.0
PEAK, TROUGH = 20.0, 4.0
# Re-plans (per spec, load step and blocklist) kept across runs: solves dominate a run's time.
PLANS_FILE = Path(os.environ["SKYBROKER_HOME"]) / "autoscale-plans.json"
PLANS: dict[str, list[dict[str, Any]]] = {}


def diurnal(days: int) -> np.ndarray:
    """Requests/s per minute of the diurnal cosine alone (the known curve)."""
    hour = (np.arange(int(days * 1440)) / 60.0) % 24
    return TROUGH + (PEAK - TROUGH) * 0.5 * (1 - np.cos(2 * np.pi * (hour - 3) / 24))


def day_rates(rng: np.random.Generator, days: int) -> np.ndarray:
    """Requests/s per minute: the diurnal cosine with bursts."""
    base = diurnal(days)
    minutes = np.arange(len(base))
    for _ in range(8 * days):
        start = int(rng.integers(0, len(minutes)))
        base[start : start + int(rng.integers(10, 31))] *= rng.uniform(1.3, 1.8)
    return base


@dataclass
class Instance:
    key: tuple
    capacity: float
    price: float
    ready_at: float
    stand_in: bool = False  # on-demand in place of a scarce spot offering


@dataclass
class Fleet:
    """Replicas as a controller keeps them for a list of targets (launch, drain, stand-ins)."""

    on_demand: dict[tuple, float]  # spot key -> the same type's on-demand $/h
    instances: list[Instance] = field(default_factory=list)
    cost: float = 0.0

    def reconcile(self, targets: list[dict[str, Any]], now: float, scarce: dict) -> None:
        keep: list[Instance] = []
        for t in targets:
            key, n = tuple(t["key"]), int(t["replicas"])
            mine = [i for i in self.instances if i.key == key and not i.stand_in]
            stand = [i for i in self.instances if i.stand_in and i.key == _od(key)]
            blocked = scarce.get(key, 0) > now
            if not blocked:
                mine += [Instance(key, t["capacity_rps"], t["price_per_hour"], now + STARTUP_S)
                         for _ in range(n - len(mine))]  # fmt: skip
            ready = sum(i.ready_at <= now for i in mine[:n])
            # scarce: stand-ins for the missing spot replicas; back: kept until spot is ready
            want_stand = max(0, n - len(mine)) if blocked else min(len(stand), n - ready)
            want_stand = want_stand if key in self.on_demand else 0
            stand += [Instance(_od(key), t["capacity_rps"], self.on_demand.get(key, 0.0),
                               now + STARTUP_S, stand_in=True)
                      for _ in range(want_stand - len(stand))]  # fmt: skip
            keep += mine[:n] + sorted(stand, key=lambda i: i.ready_at)[:want_stand]
        gone = [i for i in self.instances if i not in keep]
        self.cost += sum(i.price for i in gone) * STEP_S / 3600  # drained for a minute
        self.instances = keep

    def step(self, now: float, rng: np.random.Generator, scarce: dict) -> None:
        self.cost += sum(i.price for i in self.instances) * STEP_S / 3600
        alive = []
        for i in self.instances:
            if i.key[3] and rng.random() < PREEMPT_PER_H * STEP_S / 3600:
                if rng.random() < SCARCE_P:
                    scarce[i.key] = now + SCARCE_S
                continue
            alive.append(i)
        self.instances = alive

    def capacity(self, now: float) -> float:
        return sum(i.capacity for i in self.instances if i.ready_at <= now)


def _od(key: tuple) -> tuple:
    return (*key[:3], False)


def on_demand_prices(spec: Any) -> dict[tuple, float]:
    out = {}
    for o in load_catalog().offerings:
        if o.price is not None and o.spot_price is not None:
            out[(o.cloud, o.region, o.instance_type, True)] = min(
                o.price, out.get((o.cloud, o.region, o.instance_type, True), math.inf)
            )
    return out


class StaticPolicy:
    def __init__(self, spec: Any, rate: float = PEAK) -> None:
        self.targets = targets_from_plan(_plan(spec, rate))

    def decide(self, rate: float, now: float, scarce: dict) -> list[dict[str, Any]]:
        return self.targets


class SkyServePolicy:
    """Fixed instance types, fixed target_qps_per_replica, SkyServe's delays."""

    def __init__(self, spec: Any) -> None:
        a = spec.autoscale
        plan = _plan(spec, 1.0)
        self.rows = [(targets_from_plan(plan)[i], sum(p.serves.values()) / 1.0)
                     for i, p in enumerate(plan.placements)]  # fmt: skip
        self.qps = [t["capacity_rps"] * (1 - a.headroom) for t, _ in self.rows]
        self.min, self.max = spec.constraints.min_replicas, a.max_replicas
        self.delay = a.downscale_delay_s
        self.n = [1 for _ in self.rows]
        self.under_since: float | None = None

    def decide(self, rate: float, now: float, scarce: dict) -> list[dict[str, Any]]:
        want = [max(1, math.ceil(rate * share / q - 1e-9))
                for (_, share), q in zip(self.rows, self.qps, strict=True)]  # fmt: skip
        while sum(want) > self.max:
            want[int(np.argmax(want))] -= 1
        if any(w > n for w, n in zip(want, self.n, strict=True)):
            self.n = [max(w, n) for w, n in zip(want, self.n, strict=True)]
            self.under_since = None
        elif want != self.n:
            self.under_since = now if self.under_since is None else self.under_since
            if now - self.under_since >= self.delay:
                self.n, self.under_since = want, None
        else:
            self.under_since = None
        return [dict(t, replicas=n) for (t, _), n in zip(self.rows, self.n, strict=True)]


class SkybrokerPolicy:
    def __init__(self, spec: Any, warm: bool = False, fit: bool = False) -> None:
        self.spec = spec
        policy = Policy.from_spec(spec)
        policy.min_replicas = max(policy.min_replicas, spec.constraints.min_replicas)
        self.switch = SwitchCost(startup_s=STARTUP_S, warm=warm)
        self.scaler = Autoscaler(policy, self._replan, self.switch,
                                 Fit.from_spec(spec) if fit else None)  # fmt: skip
        self.targets = targets_from_plan(_plan(spec, TROUGH / (1 - policy.headroom)))
        self.blocked: frozenset = frozenset()
        planned = spec_for_load(spec, 1.0)  # what a re-plan solves, less its rate
        self.spec_id = hashlib.sha256(planned.model_dump_json().encode()).hexdigest()[:12]
        self.decisions: list[str] = []

    def _replan(
        self, need: float, mean_in: float, mean_out: float, running: list[dict[str, Any]]
    ) -> list[dict[str, Any]]:
        step = plan_step(need)
        warm = sorted([list(k), n] for k, n in running_counts(running).items())
        key = json.dumps([self.spec_id, step, sorted(self.blocked)] + ([warm] if warm else []))
        if key not in PLANS:
            s = self.switch
            plan = load_planner(
                self.spec, self.blocked, None, s.startup_s, s.per_launch, s.horizon_h
            )
            PLANS[key] = plan(step, mean_in, mean_out, running)
            _save_plans()
        return PLANS[key]

    def decide(self, rate: float, now: float, scarce: dict) -> list[dict[str, Any]]:
        blocked = frozenset(k for k, until in scarce.items() if until > now)
        if blocked != self.blocked:  # spot scarce (or back): re-plan with / without it
            self.blocked = blocked
            self.scaler.over_since = now - self.scaler.policy.upscale_delay_s
        d = self.scaler.decide(Load(rate=rate), self.targets, now, blocked)
        if d.changed:
            self.targets = [t for t in merge_targets(self.targets, d.targets) if t["replicas"]]
            self.decisions.append(f"{now / 3600:05.2f}h {d.reasons[0]}")
        return self.targets


def _save_plans() -> None:
    """PLANS merged into the file (runs of other seeds may be adding to it too)."""
    disk = json.loads(PLANS_FILE.read_text()) if PLANS_FILE.exists() else {}
    tmp = PLANS_FILE.with_name(f"{PLANS_FILE.name}.{os.getpid()}")
    tmp.write_text(json.dumps(disk | PLANS))
    tmp.replace(PLANS_FILE)


def _plan(spec: Any, rate: float) -> Any:
    from skybroker.targets import default_planner

    return default_planner(spec_for_load(spec, rate))


def simulate(policy: Any, rates: np.ndarray, seed: int, on_demand: dict) -> dict[str, Any]:
    rng = np.random.default_rng(seed + 1)  # the same arrivals and preemptions for each policy
    fleet, scarce = Fleet(on_demand), {}
    seen = rates[0]
    total = within = 0.0
    replicas = []
    hourly_cost: dict[int, float] = {}
    # requests outside the SLO: in a burst, else within STARTUP_S of a preemption, else other
    lost = dict.fromkeys(("burst", "preemption", "other"), 0.0)
    burst = rates > 1.15 * diurnal(len(rates) / 1440)
    preempted_at = -math.inf
    for m, rate in enumerate(rates):
        now = m * STEP_S
        fleet.reconcile(policy.decide(seen, now, scarce), now, scarce)
        before = len(fleet.instances)
        fleet.step(now, rng, scarce)
        preempted_at = now if len(fleet.instances) < before else preempted_at
        arrivals = rng.poisson(rate * STEP_S)
        cap = fleet.capacity(now)
        total += arrivals
        served = arrivals * min(1.0, cap / max(arrivals / STEP_S, 1e-9))
        within += served
        why = "burst" if burst[m] else "preemption" if now - preempted_at < STARTUP_S else "other"
        lost[why] += arrivals - served
        seen = arrivals / STEP_S
        replicas.append(len(fleet.instances))
        hourly_cost[m // 60] = (
            hourly_cost.get(m // 60, 0.0) + sum(i.price for i in fleet.instances) / 60
        )
    return {"cost": fleet.cost, "attainment": within / max(total, 1), "requests": total,
            "replicas_min": min(replicas), "replicas_max": max(replicas), "hourly": hourly_cost,
            "lost": lost}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--days", type=int, default=1)
    ap.add_argument("--headroom", type=float, default=0.2, help="autoscale.headroom")
    ap.add_argument("--decisions", type=int, default=8, help="print this many of skybroker's")
    ap.add_argument("--fresh", action="store_true", help="solve every re-plan again")
    ap.add_argument("--warm", action="store_true", help="SwitchCost.warm: also the warm re-plan")
    ap.add_argument("--fit", action="store_true", help="steps kept feasible (Fit.from_spec)")
    args = ap.parse_args()
    if PLANS_FILE.exists() and not args.fresh:
        PLANS.update(json.loads(PLANS_FILE.read_text()))
    PLANS_FILE.parent.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(Path("examples/chat-8b-us-eu.yaml").read_text())
    data["constraints"]["spot"] = "allowed"
    data["spot"] = {"fallback": "on_demand"}
    data["autoscale"] = {"min_replicas": 2, "max_replicas": 40, "upscale_delay_s": 0,
                         "downscale_delay_s": 600, "headroom": args.headroom}  # fmt: skip
    spec = parse_spec(data, "chat-8b-us-eu (spot allowed, autoscale)")
    rates = day_rates(np.random.default_rng(args.seed), args.days)
    od = on_demand_prices(spec)
    rows = {}
    curve = diurnal(args.days)[:1440].reshape(24, 60).max(axis=1)
    timed = spec.model_copy(update={"workload": spec.workload.model_copy(
        update={"schedule": {h: round(float(r), 2) for h, r in enumerate(curve)}})})  # fmt: skip
    policies = (("static peak", StaticPolicy),
                ("static max", lambda s: StaticPolicy(s, float(rates.max()))),
                ("skyserve-style", SkyServePolicy),
                ("skybroker+sched", lambda s: SkybrokerPolicy(timed, args.warm, args.fit)),
                ("skybroker", lambda s: SkybrokerPolicy(s, args.warm, args.fit)))  # fmt: skip
    for name, make in policies:
        policy = make(spec)
        rows[name] = simulate(policy, rates, args.seed, od)
        if isinstance(policy, StaticPolicy):
            rows[name]["note"] = f"${hourly(policy.targets):.2f}/h all day"
    print(f"load: {rates.min():.1f}-{rates.max():.1f} req/s (mean {rates.mean():.1f}), "
          f"{args.days} day(s), seed {args.seed}; spot preemptions {PREEMPT_PER_H}/h per "
          f"replica, scarce {SCARCE_S / 60:.0f} min with p={SCARCE_P}; headroom {args.headroom}")  # fmt: skip
    print(f"{'policy':16} {'$ total':>9} {'SLO attained':>13} {'replicas':>9}")
    for name, r in rows.items():
        print(f"{name:16} {r['cost']:9.2f} {100 * r['attainment']:12.2f}% "
              f"{r['replicas_min']:>4}-{r['replicas_max']:<4} {r.get('note', '')}")  # fmt: skip
    print("requests outside the SLO: in bursts / within a start-up of a preemption / other")
    for name, r in rows.items():
        print(f"  {name:16} " + " / ".join(f"{r['lost'][k]:6.0f}" for k in r["lost"]))
    if os.environ.get("AUTOSCALE_HOURLY"):
        for h in range(24 * args.days):
            print(
                f"{h:3d}h {rates[h * 60 : h * 60 + 60].mean():6.1f} req/s  "
                + "  ".join(f"{n[:15]} {r['hourly'].get(h, 0):5.2f}" for n, r in rows.items())
            )
    for name in ("static peak", "static max", "skyserve-style"):
        for mine in ("skybroker", "skybroker+sched"):
            saved = 1 - rows[mine]["cost"] / rows[name]["cost"]
            print(f"{mine} vs {name}: {100 * saved:.1f}% cheaper")
    if args.decisions:
        print("first decisions of skybroker's autoscaler:")
        for line in policy.decisions[: args.decisions]:
            print("  " + line)


if __name__ == "__main__":
    main()
