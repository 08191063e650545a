"""A stand-in for `sky.client.sdk` that follows SkyPilot 0.14's documented states, for what
the offline API server cannot reach (a cluster that gets UP, a job that runs and ends, a
spot reclaim). Everything it returns is SkyPilot's own type: `StatusResponse` records with a
real `CloudVmRayResourceHandle` and `sky.Resources`, `ClusterStatus` and `JobStatus` enums,
`RequestPayload`s. The states it moves through are the ones SkyPilot documents:
- `launch` -> a request; its `stream_and_get` returns `(job_id, handle)` with the cluster UP
  and job 1 SETTING_UP (setup runs as part of the job: detach_setup);
- a reclaimed spot VM on AWS/GCP is terminated, and after a refresh SkyPilot drops the
  cluster: `status` no longer lists it (`preempt`); Azure deallocates it: STOPPED (`stop`);
- the job ends FAILED_SETUP / FAILED with the driver's own log lines (`end_job`);
- `endpoints` answers {} until the port is exposed (`expose_after` calls);
- `api_status` lists requests PENDING/RUNNING/SUCCEEDED/CANCELLED; `api_cancel` cancels.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Cluster:
    name: str
    spot: bool
    labels: dict[str, str]
    status: str = "UP"
    job_status: str = "SETTING_UP"
    log: list[str] = field(default_factory=list)
    expose_after: int = 0  # endpoints calls that answer {} first
    job_error: BaseException | None = None  # what job_status raises (e.g. ClusterNotUpError)


@dataclass
class Request:
    request_id: str
    name: str
    cluster: str | None
    status: str = "SUCCEEDED"
    result: Any = None
    output: str = ""


class FakeSDK:
    """The calls of `sky.client.sdk` the provisioner makes, on an in-memory cloud."""

    def __init__(self) -> None:
        self.clusters: dict[str, Cluster] = {}
        self.requests: dict[str, Request] = {}
        self.calls: list[tuple[str, Any]] = []
        self._ids = itertools.count(1)
        self.launch_output = "launching\n"
        self.expose_after = 0

    # -- the world ----------------------------------------------------------------------------

    def add_cluster(self, name: str, spot: bool, labels: dict[str, str], **kw: Any) -> Cluster:
        self.clusters[name] = Cluster(name, spot, dict(labels), **kw)
        return self.clusters[name]

    def preempt(self, name: str) -> None:
        """AWS/GCP: the spot VM is terminated; SkyPilot's refresh drops the cluster."""
        self.clusters.pop(name)

    def stop(self, name: str) -> None:
        self.clusters[name].status = "STOPPED"

    def end_job(self, name: str, status: str, log: list[str]) -> None:
        self.clusters[name].job_status = status
        self.clusters[name].log += log

    def add_request(self, name: str, cluster: str | None, status: str) -> str:
        rid = f"req-{next(self._ids)}"
        self.requests[rid] = Request(rid, name, cluster, status)
        return rid

    # -- sky.client.sdk -----------------------------------------------------------------------

    def _request(self, name: str, cluster: str | None, result: Any, output: str = "") -> str:
        rid = self.add_request(name, cluster, "SUCCEEDED")
        self.requests[rid].result, self.requests[rid].output = result, output
        return rid

    def launch(self, task: Any, cluster_name: str | None = None, retry_until_up: bool = False,
               idle_minutes_to_autostop: int | None = None, dryrun: bool = False) -> str:  # fmt: skip
        self.calls.append(("launch", cluster_name))
        resources = next(iter(task.resources))
        cluster = self.add_cluster(
            cluster_name, bool(resources.use_spot), dict(resources.labels or {}),
            expose_after=self.expose_after,
        )  # fmt: skip
        cluster.log.append("[skybroker] python: /usr/bin/python3.11 (Python 3.11.9)")
        return self._request("launch", cluster_name, lambda: (1, self._handle(cluster)),
                             self.launch_output)  # fmt: skip

    def stream_and_get(self, request_id: str, output_stream: Any = None) -> Any:
        req = self.requests[request_id]
        if output_stream is not None and req.output:
            output_stream.write(req.output)
        return self.get(request_id)

    def get(self, request_id: str) -> Any:
        req = self.requests[request_id]
        result = req.result() if callable(req.result) else req.result
        if isinstance(result, BaseException):
            raise result
        return result

    def _handle(self, c: Cluster) -> Any:
        from sky import resources
        from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle

        res = resources.Resources(infra="aws/us-east-1", instance_type="g5.xlarge",
                                  use_spot=c.spot, labels=c.labels or None)  # fmt: skip
        return CloudVmRayResourceHandle(
            cluster_name=c.name, cluster_name_on_cloud=f"{c.name}-2ea4", cluster_yaml=None,
            launched_nodes=1, launched_resources=res,
        )  # fmt: skip

    def _record(self, c: Cluster) -> Any:
        from sky.schemas.api.responses import StatusResponse
        from sky.utils.status_lib import ClusterStatus

        return StatusResponse.model_validate(
            dict(
                name=c.name, launched_at=int(time.time()), handle=self._handle(c),
                status=ClusterStatus(c.status), autostop=-1, to_down=False,
                cluster_hash="h", cluster_ever_up=True, user_hash="2ea4", user_name="u",
                workspace="default", is_managed=False, nodes=1, labels=c.labels,
            )
        )  # fmt: skip

    def status(self, cluster_names: list[str] | None = None, refresh: Any = None) -> str:
        self.calls.append(("status", list(cluster_names) if cluster_names else None))
        names = cluster_names if cluster_names is not None else list(self.clusters)
        records = [self._record(self.clusters[n]) for n in names if n in self.clusters]
        return self._request("status", None, records)

    def job_status(self, cluster_name: str, job_ids: list[int] | None = None) -> str:
        from sky import exceptions as sx
        from sky.skylet.job_lib import JobStatus

        self.calls.append(("job_status", cluster_name))
        c = self.clusters.get(cluster_name)
        if c is None:
            return self._request("job_status", cluster_name,
                                 sx.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist."))  # fmt: skip
        if c.job_error is not None:
            return self._request("job_status", cluster_name, c.job_error)
        return self._request("job_status", cluster_name,
                             {j: JobStatus(c.job_status) for j in job_ids or [1]})  # fmt: skip

    def tail_logs(self, cluster_name: str, job_id: int | None, follow: bool, tail: int = 0,
                  output_stream: Any = None) -> int:  # fmt: skip
        self.calls.append(("tail_logs", cluster_name))
        lines = self.clusters[cluster_name].log
        output_stream.write("".join(line + "\n" for line in (lines[-tail:] if tail else lines)))
        return 0

    def endpoints(self, cluster: str, port: int | None = None) -> str:
        self.calls.append(("endpoints", cluster))
        c = self.clusters[cluster]
        if c.expose_after > 0:
            c.expose_after -= 1
            return self._request("endpoints", cluster, {})
        return self._request("endpoints", cluster, {port: f"3.90.1.2:{port}"})

    def down(self, cluster_name: str) -> str:
        from sky import exceptions as sx

        self.calls.append(("down", cluster_name))
        if self.clusters.pop(cluster_name, None) is None:
            err = sx.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
            return self._request("down", cluster_name, err)
        return self._request("down", cluster_name, None)

    def api_status(self, request_ids: list[str] | None = None) -> list[Any]:
        from sky.server.requests.payloads import RequestPayload

        self.calls.append(("api_status", request_ids))
        return [
            RequestPayload(
                request_id=r.request_id,
                name=r.name,
                entrypoint="sky.launch",
                request_body="",
                status=r.status,
                created_at=time.time(),
                user_id="2ea4",
                return_value="",
                error="",
                pid=None,
                schedule_type="long",
                cluster_name=r.cluster,
            )
            for r in self.requests.values()
            if request_ids is None or r.request_id in request_ids
        ]

    def api_cancel(self, request_ids: Any = None, silent: bool = False) -> str:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids or [])
        self.calls.append(("api_cancel", ids))
        done = []
        for rid in ids:
            if self.requests[rid].status in ("PENDING", "RUNNING"):
                self.requests[rid].status = "CANCELLED"
                done.append(rid)
        return self._request("api_cancel", None, done)
