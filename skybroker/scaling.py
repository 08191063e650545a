"""The controller's side of autoscaling: read each deployment's load, decide, apply, say why.

For a deployment whose spec has `autoscale:`, `Scaling.tick(dep)` (every `interval_s`) reads
its router's load over `autoscale.window_s` (`GET /router/load`: arrivals, token mix, in
flight per replica, each ready engine's queue and KV use), asks the deployment's `Autoscaler` (`skybroker.autoscale`, the policy)
and applies a change: new offerings of a re-plan are appended to the targets, replica counts
are set through `Controller.scale` (the reconcile launches, or drains what is too many). Each
decision is an `autoscaled` event: its message is the reason, its data the load, the
targets, the replica count and $/h after it. The deployment's blocklist (offerings failed
over from, spot ones cooling down) is the policy's `blocked`; `sizing(dep)` is the load a
failover re-plan sizes for. `scaling_view(events)` is the replica count over
time and the last decisions, as `skybroker status NAME` and the REST API show them.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from skybroker.autoscale import (
    Autoscaler,
    Decision,
    Load,
    Policy,
    SwitchCost,
    Targets,
    hourly,
    merge_targets,
    plan_step,
    total_replicas,
)
from skybroker.autoscale_fit import Fit
from skybroker.state import Deployment, Event, ReplicaStatus
from skybroker.targets import Sizing, load_planner, running_counts

log = logging.getLogger(__name__)

HISTORY_KINDS = ("created", "autoscaled", "scaled", "failover")


class Scaling:
    """The autoscalers of a controller's deployments (in memory; rebuilt after a restart)."""

    def __init__(self, controller: Any, interval_s: float = 5.0) -> None:
        self.controller = controller
        self.interval_s = interval_s
        self._scalers: dict[str, Autoscaler] = {}
        self._ticked: dict[str, float] = {}
        self._plans: dict[tuple, Targets] = {}  # re-plans, per load step and blocklist
        self._seen: dict[str, Load] = {}  # each deployment's last load

    def tick(self, dep: Deployment, now: float | None = None) -> Decision | None:
        """One look at `dep`'s load; the decision taken (None: not autoscaled, not due yet,
        or its router cannot tell)."""
        if not dep.spec.get("autoscale"):
            return None
        now = time.time() if now is None else now
        if now - self._ticked.get(dep.name, 0.0) < self.interval_s:
            return None
        self._ticked[dep.name] = now
        scaler = self._scaler(dep)
        window = float(dep.spec["autoscale"].get("window_s") or 30.0)
        seen = self.controller.routers.load(dep.name, window)
        if seen is None:
            return None
        ready = sum(r.status == ReplicaStatus.READY for r in self.controller.replicas(dep.name))
        load = Load(
            ttft_s=_quantile(seen.get("ttft_s") or {}, scaler.policy.percentile),
            starting=max(0, total_replicas(dep.targets) - ready),
            rate=float(seen["rate"]),
            input_tokens=float(seen.get("input_tokens") or 0.0),
            output_tokens=float(seen.get("output_tokens") or 0.0),
            in_flight={k: int(v) for k, v in (seen.get("in_flight") or {}).items()},
            window_s=float(seen.get("window_s") or window),
            engines={k: v for k, v in (seen.get("engines") or {}).items() if isinstance(v, dict)},
        )
        self._seen[dep.name] = load
        blocked = frozenset(tuple(k) for k in dep.blocklist)  # failed over, cooling down
        decision = scaler.decide(load, [t for t in dep.targets if t["replicas"]], now, blocked)
        if decision.changed:
            self._apply(dep, decision, load)
        return decision

    def sizing(self, dep: Deployment) -> Sizing | None:
        """What a failover re-plan of `dep` sizes for: the capacity its last observed load
        needs with the headroom free (and the schedule's rate a startup ahead), with the
        observed token mix; None where it is not autoscaled or no load was seen yet."""
        load = self._seen.get(dep.name)
        if not dep.spec.get("autoscale") or load is None:
            return None
        need = self._scaler(dep).need(load, time.time())
        return need, load.input_tokens, load.output_tokens

    def forget(self, name: str) -> None:
        self._scalers.pop(name, None)
        self._ticked.pop(name, None)
        self._seen.pop(name, None)

    def _scaler(self, dep: Deployment) -> Autoscaler:
        if dep.name not in self._scalers:
            from skybroker.spec import DeploymentSpec

            spec = DeploymentSpec.model_validate(dep.spec)
            switch = SwitchCost()
            # steps that keep the spread a spec asks for (else they add copies of what runs)
            fit = Fit.from_spec(spec) if spec.spot is not None and spec.spot.spread > 1 else None
            self._scalers[dep.name] = Autoscaler(
                Policy.from_spec(spec), self._replan(dep, spec, switch), switch, fit
            )
        return self._scalers[dep.name]

    def _replan(self, dep: Deployment, spec: Any, switch: SwitchCost) -> Any:
        def replan(need: float, mean_in: float, mean_out: float, running: Targets) -> Targets:
            current = self.controller.get(dep.name) or dep
            blocklist = frozenset(tuple(k) for k in current.blocklist)
            warm = frozenset(running_counts(running).items())
            key = (dep.name, plan_step(need), round(mean_in, -1), round(mean_out, -1),
                   blocklist, warm)  # fmt: skip
            if key not in self._plans:
                plan = load_planner(spec, blocklist, self.controller.planner, switch.startup_s,
                                    switch.per_launch, switch.horizon_h)  # fmt: skip
                self._plans[key] = plan(key[1], mean_in, mean_out, running)
            return self._plans[key]

        return replan

    def _apply(self, dep: Deployment, d: Decision, load: Load) -> None:
        merged = merge_targets(dep.targets, d.targets)
        store = self.controller.store
        if len(merged) > len(dep.targets):  # a re-plan's new offerings, at 0 until scaled
            added = [dict(t, replicas=0) for t in merged[len(dep.targets) :]]
            dep = store.update_deployment(dep.name, targets=dep.targets + added)
        for i, t in enumerate(merged):
            if t["replicas"] != dep.targets[i]["replicas"]:
                dep = self.controller.scale(dep.name, i, int(t["replicas"]))
        store.add_event(
            dep.name,
            "autoscaled",
            "; ".join(d.reasons),
            data={
                "kind": d.kind,
                "replicas": total_replicas(dep.targets),
                "cost_per_hour": round(hourly(dep.targets), 4),
                "load": {
                    "rate": round(load.rate, 3),
                    "input_tokens": round(load.input_tokens, 1),
                    "output_tokens": round(load.output_tokens, 1),
                    "in_flight": sum(load.in_flight.values()),
                    "ttft_s": load.ttft_s,
                    "waiting": load.waiting,
                    "kv_usage": round(load.kv_usage, 3),
                },
            },
        )
        log.info("%s: %s", dep.name, "; ".join(d.reasons))


def _quantile(ttft: dict[str, float], percentile: float) -> float | None:
    """The router's TTFT quantile nearest the SLO's percentile from above (p50/p90/p99)."""
    for q in (50, 90, 99):
        if f"p{q}" in ttft and q >= percentile:
            return float(ttft[f"p{q}"])
    return float(ttft["p99"]) if "p99" in ttft else None


def scaling_view(events: list[Event], limit: int = 10) -> dict[str, Any]:
    """The desired replica count and $/h over time (oldest first) and the last decisions."""
    history = []
    for e in events:
        if e.kind == "autoscaled":
            history.append([e.time, e.data.get("replicas"), e.data.get("cost_per_hour")])
        elif e.kind in ("created", "failover") and "targets" in e.data:
            ts = e.data["targets"]
            history.append([e.time, total_replicas(ts), round(hourly(ts), 4)])
    decisions = [
        {"time": e.time, "reason": e.message, **{k: e.data.get(k) for k in ("kind", "load")}}
        for e in events
        if e.kind == "autoscaled"
    ]
    return {"history": history, "decisions": decisions[-limit:]}
