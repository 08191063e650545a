"""The controller's health pass: observe each deployment off the lock, judge, act.

`Supervisor.observe(dep)` runs without the controller's lock (`skybroker.observe`: one
`statuses()` query per deployment, a `/health` probe per engine, in parallel); under the
lock `Supervisor.check(prov, dep, seen)` folds each observation into the replica's `Clock`,
asks `skybroker.verdict.judge` what to do and does it: mark ready or unready, or terminate
and count (or not) the failure. The verdicts and their reasons are in `skybroker.verdict`;
this module keeps the clocks, the suspected network outages and the events.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from skybroker.health import crash_details
from skybroker.observe import observe
from skybroker.provision import Provisioner
from skybroker.state import Deployment, DeploymentStatus, Replica, ReplicaStatus
from skybroker.verdict import (
    Clock,
    Observation,
    Verdict,
    down_engines,
    judge,
    network_suspect,
    update,
)

RUNNING_STATUSES = (ReplicaStatus.STARTING, ReplicaStatus.READY, ReplicaStatus.NOT_READY)


class Supervisor:
    """Replica clocks, last probes and suspected outages of a controller's deployments."""

    def __init__(self, controller: Any, probe_threads: int = 16) -> None:
        self.c = controller
        self.probe = controller.probe
        self.store = controller.store
        self.pool = ThreadPoolExecutor(probe_threads, thread_name_prefix="probe")
        self.probed_at: dict[str, float] = {}  # replica -> last pass every engine answered
        self.clocks: dict[str, Clock] = {}  # replica -> its startup and probe timers
        self.suspect: dict[str, float] = {}  # deployment -> since when its network is suspect

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def forget(self, replica: str) -> None:
        self.probed_at.pop(replica, None)
        self.clocks.pop(replica, None)

    def down(self) -> dict[str, set[int]]:
        """Engines the router should send nothing, by replica."""
        return {n: down_engines(c, self.probe) for n, c in self.clocks.items()}

    def restart_clock(self, dep: Deployment, rep: Replica, start: float | None = None) -> None:
        """A fresh startup and probe window from `start` (now), with the replica's own
        startup deadline (the provisioner's `startup_deadline_s`, else the probe config's)."""
        deadline = self.probe.startup_timeout_s
        per_replica = getattr(self.c._provisioner(dep.infra), "startup_deadline_s", None)
        if per_replica is not None and rep.target < len(dep.targets):
            deadline = float(per_replica(self.c._replica_spec(dep, rep)))
        start = time.time() if start is None else start
        self.clocks[rep.name] = Clock(grace_from=start, deadline_s=deadline)

    def observe(self, dep: Deployment) -> dict[str, Observation]:
        """Provider states and probes of `dep`'s running replicas; called without the lock."""
        prov = self.c._provisioner(dep.infra)
        reps = [r for r in self.store.list_replicas(dep.name) if r.status in RUNNING_STATUSES]
        now = time.time()
        progress_of = set()
        for r in reps:
            clock = self.clocks.get(r.name)
            due = clock is not None and now - clock.progress_read_at >= self.probe.progress_every_s
            if r.status == ReplicaStatus.STARTING and due:
                clock.progress_read_at = now  # type: ignore[union-attr]
                progress_of.add(r.name)
        return observe(prov, reps, dep.infra, self.c._healthy, self.pool, progress_of)

    def check(self, prov: Provisioner, dep: Deployment, seen: dict[str, Observation]) -> None:
        """Judge and act on each observed replica that still runs."""
        reps = self.store.list_replicas(dep.name)
        now = time.time()
        suspect = self._network(dep, reps, seen, now)
        for rep in reps:
            if rep.status not in RUNNING_STATUSES or rep.name not in seen:
                continue
            obs = seen[rep.name]
            if rep.name not in self.clocks:
                self.restart_clock(dep, rep, rep.launched_at or rep.created_at)
            clock = self.clocks[rep.name]
            update(clock, obs, now)
            if obs.engines and all(obs.engines):
                self.probed_at[rep.name] = now
            self._act(prov, dep, rep, judge(rep, obs, clock, self.probe, now, suspect), now)
            current = self.store.get_deployment(dep.name)
            if current is None or current.status == DeploymentStatus.FAILED:
                return

    def _network(
        self, dep: Deployment, reps: list[Replica], seen: dict[str, Observation], now: float
    ) -> bool:
        """Whether the broker's own network is suspect for `dep` (most serving replicas
        failed their probes at once), with an event when that starts and when it ends."""
        bad, served = network_suspect(reps, seen, self.probe)
        since = self.suspect.get(dep.name)
        if bad and since is None:
            self.suspect[dep.name] = now
            self.store.add_event(
                dep.name,
                "network_suspect",
                f"{bad} of {served} serving replicas failed their probes at once: suspecting "
                f"the broker's own network; replacing none on probes alone for "
                f"{self.probe.network_outage_s:.0f}s (only on the provider's word)",
            )
        elif not bad and since is not None:
            self.suspect.pop(dep.name)
            for rep in reps:  # a fresh probe window for each, from the end of the outage
                if rep.name in self.clocks:
                    self.clocks[rep.name].grace_from = now
            self.store.add_event(
                dep.name, "network_restored", f"probes answer again after {now - since:.0f}s"
            )
        return bool(bad)

    def _act(
        self, prov: Provisioner, dep: Deployment, rep: Replica, v: Verdict, now: float
    ) -> None:
        clock = self.clocks[rep.name]
        launched = rep.launched_at or rep.created_at  # a run of failures ends on a newer one
        if v.note:
            self.store.add_event(dep.name, "startup_extended", v.note, rep.name)
        if v.action == "ready":
            self.store.update_replica(
                rep.name, status=ReplicaStatus.READY, ready_at=now, failures=0, message=""
            )
            urls = ", ".join(rep.engine_urls)
            self.store.add_event(dep.name, "ready", f"{urls} /health answers 200", rep.name)
            self.c.failures.ready_for(dep.name, rep.name, launched, now)
        elif v.action == "ok" and rep.status == ReplicaStatus.READY:
            if rep.failures:
                self.store.update_replica(rep.name, failures=0)
            self.c.failures.ready_for(dep.name, rep.name, launched, rep.ready_at or now)
        elif v.action == "not_ready":
            failures = max(clock.engine_failures)
            self.store.update_replica(rep.name, status=ReplicaStatus.NOT_READY, failures=failures)
            self.store.add_event(dep.name, "not_ready", v.reason, rep.name)
        elif v.action == "failed_probe":
            self.store.update_replica(rep.name, failures=max(clock.engine_failures))
        elif v.action == "replace":
            self._replace(prov, dep, rep, v)

    def _replace(self, prov: Provisioner, dep: Deployment, rep: Replica, v: Verdict) -> None:
        """Terminate `rep` for the verdict's reason; the filling launches its replacement.
        A preemption is not counted, nor is a replacement during a suspected outage."""
        handle = self.c._handle(rep, dep.infra)
        reason = "; ".join([v.reason, *crash_details(prov, handle)]) if v.explain else v.reason
        counted = v.counted and dep.name not in self.suspect
        note = "" if counted else ", not counted as a failure"
        self.c._terminate(prov, rep, dep.infra, event=f"{reason}; replacing it{note}")
        if counted:
            self.c._count_failure(dep, reason)
        elif v.preempted and rep.spot:
            self.c.spot.reclaimed(dep, rep.offering_key)
