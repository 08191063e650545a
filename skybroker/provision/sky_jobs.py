"""How a SkyPilot replica is doing, read from SkyPilot's own states: the cluster's status
record (`sky.status`) and the replica's job (`sky.job_status`, its log).

SkyPilot runs the Task's setup and run as job 1 on the cluster after `sky launch` returns;
the cluster stays UP when the job fails. So a replica is:
- RUNNING while its cluster is UP and its job has not ended;
- FAILED once the job ended (FAILED_SETUP, FAILED, FAILED_DRIVER, SUCCEEDED, CANCELLED), or
  the cluster is AUTOSTOPPING (autostop starts only on an idle cluster: the job ended);
- PREEMPTED when a spot cluster that was UP is STOPPED (Azure deallocates spot VMs) or gone
  from `sky.status` (AWS and GCP terminate reclaimed spot VMs; SkyPilot's refresh then
  drops the cluster, the case its own `ClusterDoesNotExist` message calls "likely
  preempted" for a spot cluster, `backend_utils.check_cluster_available`);
- DEAD when an on-demand cluster is gone or STOPPED, or a cluster never came UP;
- LAUNCHING while INIT.
"""

from __future__ import annotations

import collections
import io
import re
from typing import Any

from skybroker.provision import ReplicaState
from skybroker.provision.sky_names import field_of

JOB_ENDED = {"FAILED_SETUP", "FAILED", "FAILED_DRIVER", "SUCCEEDED", "CANCELLED"}
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# SkyPilot's job driver's lines (sky/backends/task_codegen.py).
_RUN_CODES = re.compile(r"failed with return code list:\s*\[([-\d, ]+)\]")
_SETUP_CODE = re.compile(r"setup failed with return code (-?\d+)")


class RingLog(io.TextIOBase):
    """A text stream that keeps only its last `limit` characters (SkyPilot's launch logs)."""

    def __init__(self, limit: int = 64 * 1024) -> None:
        self.limit = limit
        self._parts: collections.deque[str] = collections.deque()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self._parts.append(s)
        self._size += len(s)
        while self._size > self.limit and self._parts:
            first = self._parts.popleft()
            self._size -= len(first)
            if self._size < self.limit:  # keep the end of the chunk that crossed the limit
                keep = first[len(first) - (self.limit - self._size) :]
                self._parts.appendleft(keep)
                self._size += len(keep)
        return len(s)

    def getvalue(self) -> str:
        return "".join(self._parts)


def value(status: Any) -> str | None:
    """An enum's value or a plain string (SkyPilot's enums arrive either way)."""
    if status is None:
        return None
    return str(getattr(status, "value", status))


def record_spot(record: Any) -> bool | None:
    """Whether SkyPilot launched the cluster on spot (its launched resources), None unknown."""
    resources = getattr(field_of(record, "handle"), "launched_resources", None)
    spot = getattr(resources, "use_spot", None)
    return bool(spot) if spot is not None else None


def cluster_state(record: Any, spot: bool, seen_up: bool) -> ReplicaState:
    """The replica's state from its cluster's `sky.status` record (None: not listed)."""
    if record is None:
        return ReplicaState.PREEMPTED if spot and seen_up else ReplicaState.DEAD
    status = value(field_of(record, "status"))
    if status == "UP":
        return ReplicaState.RUNNING
    if status == "INIT":
        return ReplicaState.LAUNCHING
    if status == "AUTOSTOPPING":
        return ReplicaState.FAILED
    if status == "STOPPED" and spot and seen_up:
        return ReplicaState.PREEMPTED
    return ReplicaState.DEAD


def vanished_reason(cluster: str, spot: bool, seen_up: bool) -> str:
    if spot and seen_up:
        return (
            f"spot cluster {cluster} was UP and is gone from SkyPilot after a status refresh "
            "(the cloud reclaimed it: preempted)"
        )
    what = "on-demand cluster" if not spot else "spot cluster (never seen UP)"
    return f"{what} {cluster} is gone from SkyPilot (terminated outside the broker?)"


def exit_code(log: str) -> int | None:
    """The replica job's exit status from SkyPilot's driver lines in its log, None if absent."""
    text = _ANSI.sub("", log)
    found = _SETUP_CODE.findall(text)
    if found:
        return int(found[-1])
    runs = _RUN_CODES.findall(text)
    if runs:
        codes = [int(c) for c in runs[-1].split(",") if c.strip()]
        return next((c for c in codes if c != 0), codes[0] if codes else None)
    return None


def failure_text(cluster: str, job_id: Any, job_status: str | None, log: str) -> str:
    """For a person: the job's state, its exit code and the last lines of its log."""
    parts = [f"job {job_id} on {cluster} is {job_status or 'unknown'}"]
    code = exit_code(log)
    if code is not None:
        parts.append(f"exit code {code}")
    lines = [ln for ln in _ANSI.sub("", log).splitlines() if ln.strip()]
    if lines:
        parts.append("log tail: " + " | ".join(lines[-8:])[-600:])
    return "; ".join(parts)


def progress_marker(job_status: str | None, log: str) -> str:
    """Changes while a starting replica makes progress: its job's state and last log line
    (setup's install lines, the model cache's growing size, the engine's load lines)."""
    lines = [ln for ln in _ANSI.sub("", log).splitlines() if ln.strip()]
    return f"{job_status}|{len(lines)}|{lines[-1] if lines else ''}"
