"""One look at a deployment's running replicas, taken off the controller's lock.

`observe` asks the provisioner for every replica's state in one `statuses(handles)` call
where it has one (else `status` per replica), probes `/health` of every engine of every
replica that is up (in parallel), and reads the provider's failure reason of ended replicas
and the startup progress of starting ones where it offers them. Provider errors never
replace anything: a replica whose state cannot be read counts as LAUNCHING (unknown).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from concurrent.futures import Future, ThreadPoolExecutor

from skybroker.provision import Provisioner, ProvisionError, ReplicaHandle, ReplicaState
from skybroker.state import Replica
from skybroker.verdict import Observation

UP = (ReplicaState.RUNNING, ReplicaState.LAUNCHING)


def handle_of(rep: Replica, infra: str) -> ReplicaHandle:
    """The replica's recorded handle, or one holding only its name (enough to find it)."""
    if rep.handle:
        return ReplicaHandle.from_dict(rep.handle)
    return ReplicaHandle(provider=infra, name=rep.name)


def states(prov: Provisioner, handles: list[ReplicaHandle]) -> dict[str, ReplicaState]:
    """Each handle's state: one batched query where the provisioner has `statuses`."""
    batch = getattr(prov, "statuses", None)
    if batch is not None and handles:
        try:
            got = batch(handles)
        except ProvisionError:
            got = {}
        return {h.name: got.get(h.name, ReplicaState.LAUNCHING) for h in handles}
    out = {}
    for h in handles:
        try:
            out[h.name] = prov.status(h)
        except ProvisionError:  # the provider cannot tell now: do not replace
            out[h.name] = ReplicaState.LAUNCHING
    return out


def _optional(prov: Provisioner, call: str, handle: ReplicaHandle) -> str | None:
    fn = getattr(prov, call, None)
    if fn is None:
        return None
    try:
        return fn(handle)
    except ProvisionError:
        return None


def observe(
    prov: Provisioner,
    reps: list[Replica],
    infra: str,
    healthy: Callable[[Replica, str], bool],
    pool: ThreadPoolExecutor,
    progress_of: Collection[str] = (),
) -> dict[str, Observation]:
    """What the provider and the probes say of `reps` now, by replica name; `progress_of`
    names the starting replicas whose progress marker to read."""
    handles = {r.name: handle_of(r, infra) for r in reps}
    state = states(prov, list(handles.values()))
    probes: dict[str, list[Future[bool]]] = {
        r.name: [pool.submit(healthy, r, url) for url in r.engine_urls]
        for r in reps
        if state[r.name] in UP and r.engine_urls
    }
    seen = {}
    for r in reps:
        obs = Observation(state[r.name])
        if r.name in probes:
            obs.engines = [f.result() for f in probes[r.name]]
        if obs.state in (ReplicaState.FAILED, ReplicaState.DEAD):
            obs.failure = _optional(prov, "failure", handles[r.name])
        elif r.name in progress_of:
            obs.progress = _optional(prov, "progress", handles[r.name])
        seen[r.name] = obs
    return seen
