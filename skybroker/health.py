"""Replica health policy: how replicas are probed, and runs of failures with their backoff.

`ProbeConfig` says how often and how patiently the controller probes replicas' /health and
how long a replica may drain. `Failures` counts a deployment's failures in a row (launch
errors, replicas that die or never get ready; preemptions do not count): each delays the next
launch by backoff_base_s * 2**(n-1), at most backoff_max_s; after max_launch_failures the
deployment is FAILED; a replica launched after the last failure that stays ready for
stable_s ends the run. The run lives in the event log too, so a restarted broker goes on
from where the previous one was. When to replace a replica is `skybroker.verdict`'s call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from skybroker.provision import Provisioner, ProvisionError, ReplicaHandle
from skybroker.state import Store


@dataclass
class ProbeConfig:
    """Readiness probing of replicas' /health, crash-loop backoff, and draining."""

    timeout_s: float = 2.0  # per probe
    initial_delay_s: float = 0.0  # after launch, before the first probe
    startup_timeout_s: float = 900.0  # launch -> first 200 (a provisioner may say per replica)
    startup_stall_s: float = 300.0  # past its deadline, a replica whose progress changed
    startup_max_factor: float = 4.0  # ... this recently waits on, up to this x its deadline
    progress_every_s: float = 5.0  # how often a starting replica's progress is read
    failure_threshold: int = 2  # failed probes in a row: READY -> NOT_READY
    unhealthy_timeout_s: float = 30.0  # NOT_READY this long -> replaced
    network_suspect_share: float = 0.8  # this share of >= 2 served replicas failing at once:
    network_outage_s: float = 900.0  # the broker's network is suspect; replaced after this
    max_launch_failures: int = 5
    backoff_base_s: float = 2.0
    backoff_max_s: float = 120.0
    stable_s: float = 60.0
    drain_timeout_s: float = 60.0  # a draining replica's in-flight requests get this long


@dataclass
class FailureRun:
    """A deployment's failures in a row, and when its next launch may start."""

    count: int = 0
    last_at: float = 0.0
    next_launch_at: float = 0.0
    last: str = ""


class Failures:
    """The failure runs of all deployments (in memory, mirrored in `backoff` events)."""

    def __init__(self, store: Store, probe: ProbeConfig) -> None:
        self.store = store
        self.probe = probe
        self.runs: dict[str, FailureRun] = {}

    def get(self, name: str) -> FailureRun:
        return self.runs.get(name) or FailureRun()

    def may_launch(self, name: str) -> bool:
        run = self.runs.get(name)
        return run is None or time.time() >= run.next_launch_at

    def count(self, name: str, reason: str) -> str | None:
        """One more failure in a row; the message to fail the deployment with when the run
        is over budget, else None (the next launch backs off)."""
        run = self.runs.setdefault(name, FailureRun())
        now = time.time()
        run.count += 1
        run.last_at, run.last = now, reason
        if run.count >= self.probe.max_launch_failures:
            return f"{run.count} failures in a row, giving up; last: {reason}"
        delay = min(self.probe.backoff_max_s, self.probe.backoff_base_s * 2 ** (run.count - 1))
        run.next_launch_at = now + delay
        self.store.add_event(
            name,
            "backoff",
            f"failure {run.count} of {self.probe.max_launch_failures} in a row; "
            f"next launch in {delay:.1f}s",
            data={"failures": run.count, "delay_s": delay, "reason": reason},
        )
        return None

    def restore(self, name: str) -> None:
        """The run a previous broker counted, from the event log: the last `backoff` event,
        unless a `recovered` one came after it."""
        for e in reversed(self.store.list_events(name, limit=500)):
            if e.kind == "recovered":
                return
            if e.kind == "backoff":
                count = int(e.data.get("failures", 0))
                delay = float(e.data.get("delay_s", 0.0))
                if count:
                    reason = str(e.data.get("reason", ""))
                    self.runs[name] = FailureRun(count, e.time, e.time + delay, reason)
                return

    def ready_for(self, name: str, replica: str, launched: float, ready_at: float | None) -> None:
        """End the run once a replica launched after it has stayed ready for stable_s."""
        run = self.runs.get(name)
        if run is None or not run.count or ready_at is None:
            return
        if launched >= run.last_at and time.time() - ready_at >= self.probe.stable_s:
            self.runs.pop(name)
            self.store.add_event(
                name, "recovered", f"ready for {self.probe.stable_s:.0f}s", replica
            )


def crash_details(prov: Provisioner, handle: ReplicaHandle) -> list[str]:
    """What the provider knows of how a replica ended: its exit code, its last log lines."""
    parts = []
    code = getattr(prov, "exit_code", lambda _h: None)(handle)
    if code is not None:
        parts.append(f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
    try:
        tail = prov.logs(handle, tail=5).strip()
    except ProvisionError:
        tail = ""
    if tail:
        parts.append("log tail: " + " | ".join(tail.splitlines())[-400:])
    return parts
