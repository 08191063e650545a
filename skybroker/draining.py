"""Draining: a replica leaves without dropping a request.

A replica the plan no longer wants (a scale-down, a re-plan, stand-ins whose replacements
are ready), and every replica at `down`, is DRAINING: the router sends it nothing new, and it
is stopped once the router has no request in flight on it, or after `drain_timeout_s`.
A replica that never served is stopped at once.
"""

from __future__ import annotations

import time
from typing import Any

from skybroker.provision import Provisioner
from skybroker.state import Deployment, Replica, ReplicaStatus
from skybroker.supervisor import RUNNING_STATUSES


class Drains:
    """When each of a controller's draining replicas began to drain."""

    def __init__(self, controller: Any) -> None:
        self.c = controller
        self.since: dict[str, float] = {}

    def adopted(self, replica: str) -> None:
        """A replica a previous broker was draining: it drains on, from now."""
        self.since[replica] = time.time()

    def retire(self, dep: Deployment, rep: Replica, why: str) -> None:
        """Stop a replica the plan no longer wants: at once if it never served, else drain it
        first (the router sends it nothing new; in-flight requests finish)."""
        if rep.status not in (ReplicaStatus.READY, ReplicaStatus.NOT_READY):
            self.c._terminate(self.c._provisioner(dep.infra), rep, dep.infra, event=why)
            return
        self.c.store.update_replica(rep.name, status=ReplicaStatus.DRAINING, message=why)
        self.since[rep.name] = time.time()
        self.c.store.add_event(dep.name, "draining", f"{why}: no new requests", rep.name)
        self.c._update_router(dep)

    def check(self, prov: Provisioner, dep: Deployment, rep: Replica) -> None:
        """Stop a draining replica once nothing is in flight on it, or it drained too long."""
        since = self.since.setdefault(rep.name, time.time())
        busy = self.c.routers.in_flight(dep.name, {rep.name})
        late = time.time() - since > self.c.probe.drain_timeout_s
        if not busy or late:
            what = f"drained; {rep.message}" if not late else f"{rep.message} (drain timed out)"
            self.since.pop(rep.name, None)
            self.c._terminate(prov, rep, dep.infra, event=what)

    def all(self, dep: Deployment) -> None:
        """Before `down`: every replica drains (until the drain timeout)."""
        reps = [r for r in self.c.store.list_replicas(dep.name) if r.status in RUNNING_STATUSES]
        if not reps or dep.name not in self.c.routers:
            return
        for rep in reps:
            self.c.store.update_replica(rep.name, status=ReplicaStatus.DRAINING)
        self.c._update_router(dep)
        names = {r.name for r in reps}
        deadline = time.monotonic() + self.c.probe.drain_timeout_s
        while (self.c.routers.in_flight(dep.name, names) or 0) > 0 and time.monotonic() < deadline:
            time.sleep(0.1)
