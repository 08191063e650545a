"""Reading a SkyPilot replica's state: one `sky.status` for many clusters, the job state of
UP ones (at most every `job_poll_s`), why a replica ended, and its start-up progress. A mixin
of the SkyPilot provisioner (`self._sdk()`, `_cluster`, `logs`, `_seen`, `job_poll_s`);
the rules of what SkyPilot's states mean are in `sky_jobs`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from skybroker.provision import ProvisionError, ReplicaHandle, ReplicaState, sky_jobs, sky_names
from skybroker.provision.sky_sdk import map_sky_error

log = logging.getLogger(__name__)


def _refresh(mode: str) -> Any:
    from sky.utils import common

    return getattr(common.StatusRefreshMode, mode)


@dataclasses.dataclass
class Seen:
    """What the provisioner learnt of one replica since it started (not persisted)."""

    job_status: str | None = None
    job_checked_at: float = 0.0
    failure: str | None = None
    progress: str | None = None
    progress_at: float = 0.0


class SkyWatch:
    """The state-reading calls of the SkyPilot provisioner."""

    job_poll_s: float
    _seen: dict[str, Seen]

    def _sdk(self) -> Any:
        raise NotImplementedError

    def _cluster(self, handle: ReplicaHandle) -> str:
        raise NotImplementedError

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        raise NotImplementedError

    def _records(self, clusters: list[str] | None, mode: str = "AUTO") -> list[Any]:
        sdk = self._sdk()
        try:
            return list(sdk.get(sdk.status(clusters, refresh=_refresh(mode))) or [])
        except Exception as e:
            raise map_sky_error(e, None, "sky status") from e

    def statuses(self, handles: list[ReplicaHandle]) -> dict[str, ReplicaState]:
        """Every replica's state from one `sky.status` call (spot clusters refresh against
        the cloud), plus the job state of UP clusters (at most every `job_poll_s`)."""
        if not handles:
            return {}
        by_cluster = {self._cluster(h): h for h in handles}
        records = {
            sky_names.field_of(r, "name"): r for r in self._records(list(by_cluster), "AUTO")
        }
        return {h.name: self._state(h, c, records.get(c)) for c, h in by_cluster.items()}

    def status(self, handle: ReplicaHandle) -> ReplicaState:
        return self.statuses([handle])[handle.name]

    def _state(self, handle: ReplicaHandle, cluster: str, record: Any) -> ReplicaState:
        seen = self._seen.setdefault(handle.name, Seen())
        spot = sky_jobs.record_spot(record) if record is not None else None
        if spot is not None:
            handle.info["spot"] = spot
        spot = bool(handle.info.get("spot"))
        seen_up = bool(handle.info.get("seen_up"))
        state = sky_jobs.cluster_state(record, spot, seen_up)
        if state == ReplicaState.RUNNING:
            handle.info["seen_up"] = True
            if handle.info.get("job_id") is not None and self._job_ended(handle, cluster, seen):
                state = ReplicaState.FAILED
        status = sky_jobs.value(sky_names.field_of(record, "status")) if record else None
        if state in (ReplicaState.PREEMPTED, ReplicaState.DEAD) and record is None:
            seen.failure = sky_jobs.vanished_reason(cluster, spot, seen_up)
        elif state == ReplicaState.PREEMPTED:
            seen.failure = f"spot cluster {cluster} was stopped by the cloud (preempted)"
        elif state == ReplicaState.DEAD:
            seen.failure = f"cluster {cluster} is {status} (stopped outside the broker?)"
        elif state == ReplicaState.FAILED and seen.failure is None:
            if seen.job_status is None and handle.info.get("job_id") is not None:
                self._job_ended(handle, cluster, seen)  # AUTOSTOPPING: read how the job ended
            seen.failure = self._job_failure(handle, cluster, seen)
            if status == "AUTOSTOPPING":
                seen.failure += f"; the cluster is AUTOSTOPPING (idle: {cluster}'s job ended)"
        return state

    def _job_status(self, cluster: str, job_id: Any) -> str | None:
        sdk = self._sdk()
        try:
            found = sdk.get(sdk.job_status(cluster, job_ids=[int(job_id)])) or {}
        except Exception as e:
            raise map_sky_error(e, None, "sky queue") from e
        status = found.get(int(job_id), found.get(str(job_id)))
        return sky_jobs.value(status)

    def _job_ended(self, handle: ReplicaHandle, cluster: str, seen: Seen) -> bool:
        if seen.job_status in sky_jobs.JOB_ENDED:
            return True
        now = time.monotonic()
        if now - seen.job_checked_at >= self.job_poll_s:
            seen.job_checked_at = now
            try:
                seen.job_status = self._job_status(cluster, handle.info["job_id"])
            except ProvisionError as e:  # this cluster's job cannot be read now: unknown
                log.debug("job state of %s: %s", cluster, e)
        return seen.job_status in sky_jobs.JOB_ENDED

    def _job_failure(self, handle: ReplicaHandle, cluster: str, seen: Seen) -> str:
        job_id = handle.info.get("job_id")
        try:
            log = self.logs(handle, tail=40)
        except ProvisionError as e:
            log = f"(log unavailable: {e})"
        return sky_jobs.failure_text(cluster, job_id, seen.job_status, log)

    def failure(self, handle: ReplicaHandle) -> str | None:
        """Why a FAILED, PREEMPTED or DEAD replica ended: the job's state and exit code and its
        log tail, or how its cluster went away; None when nothing is known."""
        seen = self._seen.get(handle.name)
        return seen.failure if seen else None

    def exit_code(self, handle: ReplicaHandle) -> int | None:
        """The replica job's exit status as SkyPilot's driver logged it, None when unknown."""
        seen = self._seen.get(handle.name)
        if seen is None or seen.job_status not in sky_jobs.JOB_ENDED:
            return None
        try:
            return sky_jobs.exit_code(self.logs(handle, tail=40))
        except ProvisionError:
            return None

    def progress(self, handle: ReplicaHandle) -> str | None:
        """A marker that changes while a starting replica installs, downloads and loads: the
        job's state and its log's last line (setup prints install lines, the run script the
        model cache's size every 30 s while it grows). None when the log cannot be read."""
        job_id = handle.info.get("job_id")
        if job_id is None:
            return None
        seen = self._seen.setdefault(handle.name, Seen())
        now = time.monotonic()
        if seen.progress is not None and now - seen.progress_at < self.job_poll_s:
            return seen.progress  # two SSH round trips: at most every job_poll_s
        try:
            status = self._job_status(self._cluster(handle), job_id)
            marker = sky_jobs.progress_marker(status, self.logs(handle, tail=5))
        except ProvisionError:
            return None
        seen.progress, seen.progress_at = marker, now
        return marker
