"""Why a replica is kept, marked ready or unready, or replaced: one function, `judge`.

Each reconcile pass observes every running replica off the controller's lock
(`skybroker.observe`: the provider's state, one `/health` probe per engine, the provider's
failure reason and startup progress) and `judge` turns one observation into a `Verdict`:

- provider evidence first: PREEMPTED is replaced without counting (a spot reclaim); FAILED
  (the machine is up, its job ended) and DEAD are replaced at once and counted;
- a starting replica has until its startup deadline (the provisioner's
  `startup_deadline_s(spec)`, else `ProbeConfig.startup_timeout_s`), and past it as long as
  its `progress()` marker changed within `startup_stall_s` (at most `startup_max_factor` x
  the deadline);
- a ready replica whose every engine failed `failure_threshold` probes in a row is
  NOT_READY (engines of a data-parallel replica that fail alone are only taken out of the
  router's set); one with a failing engine for `unhealthy_timeout_s` is replaced;
- while most of a deployment's served replicas fail their probes at once the broker's own
  network is suspect (`network_suspect`): probes alone replace nothing until
  `network_outage_s` has passed.

Each clock starts at the replica's `grace_from`: its launch, its adoption by a restarted
broker, or the end of a suspected network outage, so each of those gets a fresh window.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skybroker.health import ProbeConfig
from skybroker.provision import ReplicaState
from skybroker.state import Replica, ReplicaStatus


@dataclass
class Observation:
    """What one pass saw of one replica."""

    state: ReplicaState
    engines: list[bool] | None = None  # /health answered 200, per engine (None: not probed)
    failure: str | None = None  # the provider's reason a FAILED/DEAD replica ended
    progress: str | None = None  # the provider's startup progress marker (None: not read)


@dataclass
class Clock:
    """A replica's timers, kept in memory by the controller."""

    grace_from: float  # its startup and probe windows start here
    deadline_s: float  # launch -> first healthy probe
    ok_at: float | None = None  # last pass in which every engine answered
    engine_failures: list[int] = field(default_factory=list)  # probes failed in a row
    progress: str | None = None
    progress_at: float = 0.0  # when the progress marker last changed
    progress_read_at: float = 0.0  # when the marker was last read
    extended: bool = False  # a startup_extended event was recorded


@dataclass
class Verdict:
    """What to do with a replica: ok, ready, not_ready, wait, replace."""

    action: str
    reason: str = ""
    counted: bool = True  # a replacement counts toward max_launch_failures
    preempted: bool = False
    explain: bool = False  # append the provider's exit code and log tail to the reason
    note: str = ""  # an event worth recording though nothing changes (startup_extended)


def failing(obs: Observation) -> bool:
    """Every engine of the replica failed its probe this pass."""
    return obs.engines is not None and bool(obs.engines) and not any(obs.engines)


def update(clock: Clock, obs: Observation, now: float) -> None:
    """Fold one observation into the replica's timers."""
    if obs.progress is not None and obs.progress != clock.progress:
        clock.progress, clock.progress_at = obs.progress, now
    if obs.engines is None:
        return
    if len(clock.engine_failures) != len(obs.engines):
        clock.engine_failures = [0] * len(obs.engines)
    clock.engine_failures = [0 if ok else n + 1 for ok, n in
                             zip(obs.engines, clock.engine_failures, strict=True)]  # fmt: skip
    if all(obs.engines):
        clock.ok_at = now


def down_engines(clock: Clock, probe: ProbeConfig) -> set[int]:
    """Engines the router should send nothing: failed failure_threshold probes in a row."""
    return {i for i, n in enumerate(clock.engine_failures) if n >= probe.failure_threshold}


def judge(
    rep: Replica,
    obs: Observation,
    clock: Clock,
    probe: ProbeConfig,
    now: float,
    network_suspect: bool = False,
) -> Verdict:
    """The verdict on `rep` (its clock already updated with `obs`)."""
    name = rep.name
    if obs.state == ReplicaState.PREEMPTED:
        where = f"{rep.cloud}/{rep.region}/{rep.instance_type}"
        market = "spot " if rep.spot else ""
        return Verdict("replace", f"replica {name} preempted ({market}{where})", counted=False,
                       preempted=True)  # fmt: skip
    if obs.state == ReplicaState.FAILED:
        if obs.failure:
            return Verdict("replace", f"replica {name} failed: {obs.failure}")
        return Verdict("replace", f"replica {name} failed (its job ended)", explain=True)
    if obs.state == ReplicaState.DEAD:
        if obs.failure:
            return Verdict("replace", f"replica {name} died: {obs.failure}")
        return Verdict("replace", f"replica {name} died", explain=True)
    if obs.engines is None or now - clock.grace_from < probe.initial_delay_s:
        return Verdict("ok")
    if all(obs.engines):
        return Verdict("ready" if rep.status != ReplicaStatus.READY else "ok")
    if rep.status == ReplicaStatus.STARTING:
        return _starting(rep, clock, probe, now)
    return _unhealthy(rep, obs, clock, probe, now, network_suspect)


def _starting(rep: Replica, clock: Clock, probe: ProbeConfig, now: float) -> Verdict:
    waited = now - clock.grace_from
    if waited <= clock.deadline_s:
        return Verdict("wait")
    moving = clock.progress_at and now - clock.progress_at < probe.startup_stall_s
    if moving and waited <= clock.deadline_s * probe.startup_max_factor:
        note = "" if clock.extended else (
            f"past its {clock.deadline_s:.0f}s startup deadline but still making progress "
            f"({clock.progress}): waiting up to {clock.deadline_s * probe.startup_max_factor:.0f}s"
        )  # fmt: skip
        clock.extended = True
        return Verdict("wait", note=note)
    return Verdict(
        "replace", f"replica {rep.name} never became ready ({waited:.0f}s)", explain=True
    )


def _unhealthy(
    rep: Replica,
    obs: Observation,
    clock: Clock,
    probe: ProbeConfig,
    now: float,
    network_suspect: bool,
) -> Verdict:
    assert obs.engines is not None
    all_down = len(down_engines(clock, probe)) == len(obs.engines)
    if rep.status == ReplicaStatus.READY and all_down:
        return Verdict("not_ready", f"{max(clock.engine_failures)} probes failed")
    since = max(clock.ok_at or clock.grace_from, clock.grace_from)
    limit = probe.network_outage_s if network_suspect else probe.unhealthy_timeout_s
    bad = [i for i, ok in enumerate(obs.engines) if not ok]
    if now - since <= limit or (rep.status == ReplicaStatus.READY and len(bad) == len(obs.engines)):
        return Verdict("failed_probe")
    what = "was unhealthy too long" if len(bad) == len(obs.engines) else (
        f"engine {', '.join(map(str, bad))} of {len(obs.engines)} was unhealthy too long"
    )  # fmt: skip
    if network_suspect:
        what += f" (no probe answered for {now - since:.0f}s)"
    return Verdict("replace", f"replica {rep.name} {what}", explain=True)


def network_suspect(
    reps: list[Replica], seen: dict[str, Observation], probe: ProbeConfig
) -> tuple[int, int]:
    """(failing, served) when most of the served replicas (READY or NOT_READY, up as far as
    the provider knows) failed every probe this pass, else (0, served): then the broker's
    own network is the likelier cause than that many replicas at once."""
    up = (ReplicaState.RUNNING, ReplicaState.LAUNCHING)
    served = [
        seen[r.name]
        for r in reps
        if r.status in (ReplicaStatus.READY, ReplicaStatus.NOT_READY)
        and r.name in seen
        and seen[r.name].state in up
        and seen[r.name].engines
    ]
    bad = sum(failing(o) for o in served)
    if len(served) >= 2 and bad >= probe.network_suspect_share * len(served):
        return bad, len(served)
    return 0, len(served)
