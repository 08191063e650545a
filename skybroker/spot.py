"""Spot replicas: reclaims, cool-downs, on-demand stand-ins, and their drain when spot returns.

A preempted replica is replaced without counting as a failure (`skybroker.verdict`). Here:

- `reclaims_to_cool` reclaims of one offering (cloud, region, instance type, spot) within
  `reclaim_window_s`, or one spot `CapacityError`, put that offering on a cool-down: it joins
  the deployment's blocklist for `cooldown_s` and the plan is re-solved without it (a
  `cooldown` event, then `failover`);
- the re-plan sizes for the observed load where the deployment is autoscaled (`sizing`:
  `Scaling.sizing`, the last rate seen with its headroom), else for `workload.rate`;
- the re-plan may bring in on-demand replicas for the lost spot ones when the spec's
  `spot.fallback` is `on_demand` (the default); with `none` it keeps only spot offerings and
  the on-demand ones that ran before;
- when the cool-down ends the offering leaves the blocklist and the plan is re-solved, sized
  the same way (`cooldown_ended`). Offerings the new plan drops stay as `standby` targets, serving, until
  every other target has its replicas ready; then they are drained (`fallback_drained`), so
  no capacity gap opens and no request is lost.

Cool-downs live in the event log too, so a restarted broker keeps them.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skybroker.state import Deployment, ReplicaStatus, Store
from skybroker.targets import (
    Planner,
    Sizing,
    describe_key,
    plan_summary,
    replan,
    set_targets,
    solve,
    targets_from_plan,
)

Key = tuple[str, str, str, bool]
Targets = list[dict[str, Any]]


@dataclass
class SpotConfig:
    reclaim_window_s: float = 1800.0
    reclaims_to_cool: int = 2  # reclaims of one offering within the window: cool it down
    cooldown_s: float = 900.0  # how long a cooled-down offering stays out of the plan


def keep_on_demand(old: Targets, new: Targets) -> Targets:
    """`spot.fallback: none`: of a re-plan, the spot targets and, of the on-demand ones, only
    what ran before (no on-demand replica stands in for a lost spot one)."""
    before = {tuple(t["key"]): t["replicas"] for t in old if not t["key"][3]}
    out = []
    for t in new:
        key = tuple(t["key"])
        if t["key"][3]:
            out.append(t)
        elif key in before:
            out.append(dict(t, replicas=min(t["replicas"], before[key])))
    return out


def with_standby(old: Targets, new: Targets, live: dict[Key, int]) -> Targets:
    """`new`, plus the old targets it drops that still have live replicas, as standby."""
    keys = {tuple(t["key"]) for t in new}
    kept = [
        dict(t, replicas=live[tuple(t["key"])], standby=True)
        for t in old
        if tuple(t["key"]) not in keys and live.get(tuple(t["key"]))
    ]
    return new + kept


class SpotHedge:
    """The cool-downs and stand-ins of a controller's deployments."""

    def __init__(
        self,
        store: Store,
        planner: Planner,
        config: SpotConfig | None = None,
        sizing: Callable[[Deployment], Sizing | None] | None = None,
    ) -> None:
        self.store = store
        self.planner = planner
        self.config = config or SpotConfig()
        self.sizing = sizing or (lambda dep: None)  # the load a re-plan is for (None: the spec's)
        self.until: dict[str, dict[Key, float]] = {}  # deployment -> offering -> cool-down end
        self._reclaims: dict[tuple[str, Key], deque[float]] = {}

    def cooling(self, name: str) -> dict[Key, float]:
        return dict(self.until.get(name, {}))

    def reclaimed(self, dep: Deployment, key: Key) -> None:
        """One more reclaim of `key`: cool it down when they repeat."""
        now = time.time()
        seen = self._reclaims.setdefault((dep.name, key), deque())
        seen.append(now)
        while seen and now - seen[0] > self.config.reclaim_window_s:
            seen.popleft()
        if len(seen) < self.config.reclaims_to_cool:
            return
        seen.clear()
        window = self.config.reclaim_window_s / 60
        self.cool_down(dep, key, f"{self.config.reclaims_to_cool} reclaims within {window:.0f} min")

    def cool_down(self, dep: Deployment, key: Key, why: str) -> None:
        """Keep `key` out of the plan for cooldown_s and re-plan without it (when nothing else
        is feasible, the deployment waits for the cool-down with what else it has)."""
        key = tuple(key)  # type: ignore[assignment]
        if key in {tuple(k) for k in dep.blocklist}:
            return
        until = time.time() + self.config.cooldown_s
        self.until.setdefault(dep.name, {})[key] = until
        self.store.add_event(
            dep.name,
            "cooldown",
            f"{describe_key(key)} out of the plan for {self.config.cooldown_s / 60:.0f} min: {why}",
            data={"key": list(key), "until": until},
        )
        fallback = (dep.spec.get("spot") or {}).get("fallback", "on_demand")
        shape = keep_on_demand if fallback == "none" else None
        stuck = replan(self.store, self.planner, dep, key, shape, self.sizing(dep))
        if stuck is not None:  # nothing else is feasible: wait for the cool-down to end
            dep = self.store.get_deployment(dep.name) or dep
            rest = [t for t in dep.targets if tuple(t["key"]) != key]
            set_targets(self.store, dep, rest)
            self.store.add_event(dep.name, "failover", f"{stuck}; waiting for the cool-down",
                                 data={"blocked": list(key), "targets": rest})  # fmt: skip
        return None

    def tick(self, dep: Deployment) -> None:
        """End due cool-downs (re-plan with the offering allowed again) and drain stand-ins
        once what replaced them is ready."""
        now = time.time()
        for key, until in self.cooling(dep.name).items():
            if now >= until:
                dep = self._warm_up(self.store.get_deployment(dep.name) or dep, key)
        self._release(self.store.get_deployment(dep.name) or dep)

    def _warm_up(self, dep: Deployment, key: Key) -> Deployment:
        self.until.get(dep.name, {}).pop(key, None)
        blocklist = {tuple(k) for k in dep.blocklist} - {key}
        dep = self.store.update_deployment(dep.name, blocklist=sorted(blocklist))
        message = f"{describe_key(key)} allowed again"
        try:
            plan = solve(self.planner, dep, blocklist, self.sizing(dep))
        except Exception as e:  # keep what runs
            self.store.add_event(dep.name, "cooldown_ended", f"{message}; re-plan failed: {e}",
                                 data={"key": list(key)})  # fmt: skip
            return dep
        new = targets_from_plan(plan)
        old = [t for t in dep.targets if not t.get("standby")]
        if {tuple(t["key"]) for t in new} != {tuple(t["key"]) for t in old}:
            live: dict[Key, int] = {}
            for r in self.store.list_replicas(dep.name):
                if r.status in (ReplicaStatus.READY, ReplicaStatus.NOT_READY):
                    live[r.offering_key] = live.get(r.offering_key, 0) + 1
            targets = with_standby(dep.targets, new, live)
            dep = set_targets(self.store, dep, targets, plan)
            message += f": re-planned {plan_summary(new)} (was {plan_summary(old)})"
        self.store.add_event(
            dep.name, "cooldown_ended", message, data={"key": list(key), "targets": dep.targets}
        )
        return dep

    def _release(self, dep: Deployment) -> None:
        standby = [t for t in dep.targets if t.get("standby")]
        if not standby:
            return
        ready: dict[int, int] = {}
        for r in self.store.list_replicas(dep.name):
            if r.status == ReplicaStatus.READY:
                ready[r.target] = ready.get(r.target, 0) + 1
        wanted = [(i, t) for i, t in enumerate(dep.targets) if not t.get("standby")]
        if any(ready.get(i, 0) < t["replicas"] for i, t in wanted):
            return
        set_targets(self.store, dep, [t for _, t in wanted])
        n = sum(t["replicas"] for t in standby)
        self.store.add_event(
            dep.name,
            "fallback_drained",
            f"their replacements are ready: draining {n} stand-in replica(s) on "
            + ", ".join(describe_key(t["key"]) for t in standby),
        )

    def restore(self, dep: Deployment) -> None:
        """The cool-downs a previous broker started, from the event log."""
        blocked = {tuple(k) for k in dep.blocklist}
        until: dict[Key, float] = {}
        for e in self.store.list_events(dep.name, limit=None):
            key = tuple(e.data.get("key") or ())
            if e.kind == "cooldown" and key in blocked:
                until[key] = float(e.data["until"])  # type: ignore[index]
            elif e.kind == "cooldown_ended":
                until.pop(key, None)  # type: ignore[arg-type]
        if until:
            self.until[dep.name] = until

    def forget(self, name: str) -> None:
        self.until.pop(name, None)
        for k in [k for k in self._reclaims if k[0] == name]:
            self._reclaims.pop(k)
