"""The SkyPilot provisioner: one SkyPilot cluster per replica, pinned to the planned offering.

The Task's setup installs the engine extra, its run starts `python -m engine.serve`; the
Resources are pinned to the plan's cloud, region, instance type and market with the engine's
port exposed. Calls go through SkyPilot's asynchronous SDK (`sky.launch` returns a request id,
`sky.stream_and_get` / `sky.get` wait), and SkyPilot's exceptions become the broker's own
(`CapacityError` feeds failover). `sky` is imported lazily: the broker runs without it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import re
from pathlib import Path
from typing import Any, TextIO

from skybroker import __version__
from skybroker.provision import (
    CapacityError,
    CredentialsError,
    MissingExtraError,
    NoCloudAccessError,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    engine_command,
    shell_join,
)

ENGINE_PORT = 8000
REMOTE_MODEL_DIR = "/skybroker/model"
_CLUSTER_PREFIX = "sb-"


def import_sky() -> Any:
    """SkyPilot's SDK, or a MissingExtraError that says how to install it."""
    try:
        import sky
    except ImportError as e:
        raise MissingExtraError(
            f"SkyPilot is not installed ({e}); infra 'skypilot' needs it: "
            "pip install 'skybroker[cloud]'"
        ) from e
    return sky


def cluster_name(replica_name: str) -> str:
    """SkyPilot cluster name of a replica: `sb-<name>`, lowercase, [a-z0-9-], <= 60 chars."""
    name = re.sub(r"[^a-z0-9-]+", "-", replica_name.lower()).strip("-")
    return (_CLUSTER_PREFIX + name)[:60].rstrip("-")


def project_root() -> Path | None:
    """The source tree holding `engine/` and pyproject.toml (an editable/dev install), or None.

    Found without importing the engine (the broker never imports it).
    """
    found = importlib.util.find_spec("engine")
    if found is None or not found.submodule_search_locations:
        return None
    root = Path(next(iter(found.submodule_search_locations))).parent
    return root if (root / "pyproject.toml").exists() else None


class SkyPilotProvisioner:
    """Engine replicas on clouds through SkyPilot (one single-node cluster per replica)."""

    name = "skypilot"

    def __init__(
        self,
        port: int = ENGINE_PORT,
        workdir: Path | bool | None = True,
        extras: str = "engine,gpu",
        idle_minutes_to_autostop: int | None = None,
        output_stream: TextIO | None = None,
    ) -> None:
        """`workdir=True` uploads this project's source tree when it is one (a dev install);
        False or no tree found installs `skybroker[extras]` of this version from PyPI."""
        self.port = port
        self.workdir = project_root() if workdir is True else (workdir or None)
        self.extras = extras
        self.idle_minutes_to_autostop = idle_minutes_to_autostop
        self.output_stream = output_stream if output_stream is not None else io.StringIO()

    # -- building the task --------------------------------------------------------------------

    def setup_command(self) -> str:
        if self.workdir is not None:
            return f"pip install -q -e '.[{self.extras}]'"
        return f"pip install -q 'skybroker[{self.extras}]=={__version__}'"

    def model_mount(self, model: str) -> tuple[str, dict[str, str]]:
        """The model argument on the replica, and the file_mounts that bring a local model."""
        path = Path(model).expanduser()
        if not path.exists():
            return model, {}  # a hub id: the replica downloads it (token passed as a secret)
        if path.is_dir():
            return REMOTE_MODEL_DIR, {REMOTE_MODEL_DIR: str(path.resolve())}
        remote = f"{REMOTE_MODEL_DIR}/{path.name}"
        return remote, {remote: str(path.resolve())}

    def ports(self, spec: ReplicaSpec) -> list[int]:
        return [self.port + i for i in range(max(1, spec.data_parallel))]

    def run_command(self, spec: ReplicaSpec) -> str:
        """One engine, or `data_parallel` engines each on its own GPUs and port."""
        ports = self.ports(spec)
        if len(ports) == 1:
            return shell_join(engine_command(spec, "0.0.0.0", ports[0]))
        tp = spec.tensor_parallel_size
        lines = []
        for i, port in enumerate(ports):
            gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
            cmd = shell_join(engine_command(spec, "0.0.0.0", port))
            lines.append(f"CUDA_VISIBLE_DEVICES={gpus} {cmd} &")
        return "\n".join([*lines, "wait"])

    def build_resources(self, spec: ReplicaSpec) -> Any:
        sky = import_sky()
        if spec.cloud == "local":
            raise ProvisionError(
                f"replica {spec.name} is planned on this machine (cloud 'local'); "
                "use infra: local for it"
            )
        engines = max(1, spec.data_parallel)
        if spec.gpu_count and spec.tensor_parallel_size * engines > spec.gpu_count:
            raise ProvisionError(
                f"replica {spec.name}: {engines} engine(s) x tensor parallel "
                f"{spec.tensor_parallel_size} need {engines * spec.tensor_parallel_size} GPUs, "
                f"but {spec.instance_type} has {spec.gpu_count}"
            )
        # The GPUs are pinned too, so SkyPilot rejects an instance type that lacks them.
        accelerators = {spec.gpu: spec.gpu_count} if spec.gpu and spec.gpu_count else None
        return sky.Resources(
            infra=f"{spec.cloud}/{spec.region}",
            instance_type=spec.instance_type,
            accelerators=accelerators,
            use_spot=spec.spot,
            ports=self.ports(spec),
        )

    def build_task(self, spec: ReplicaSpec) -> Any:
        """The sky.Task of one replica (secrets go to SkyPilot's `secrets`, never to envs)."""
        sky = import_sky()
        model, file_mounts = self.model_mount(spec.model)
        remote = dataclasses.replace(spec, model=model)
        run = self.run_command(remote)
        task = sky.Task(
            name=cluster_name(spec.name),
            setup=self.setup_command(),
            run=run,
            envs=dict(spec.envs),
            secrets=dict(spec.secrets) or None,
            workdir=str(self.workdir) if self.workdir else None,
            file_mounts=file_mounts or None,
        )
        task.set_resources(self.build_resources(spec))
        return task

    # -- the Provisioner interface ------------------------------------------------------------

    def check(self, clouds: set[str]) -> None:
        """Raise unless SkyPilot is installed and can use every cloud in `clouds` (`sky check`
        through its API server); the error says what to install or configure."""
        sky = import_sky()
        wanted = sorted(c.lower() for c in clouds)
        if "local" in wanted:
            raise ProvisionError("the plan runs on this machine (cloud 'local'): use infra: local")
        try:
            result = sky.get(sky.check(tuple(wanted), verbose=False)) or {}
        except Exception as e:
            raise map_sky_error(e, None) from e
        enabled = {
            cloud.lower()
            for workspace in result.values()
            for cloud, capabilities in (workspace or {}).items()
            if "compute" in capabilities
        }
        missing = [c for c in wanted if c not in enabled]
        if not missing:
            return
        fix = (
            f"configure credentials for {', '.join(missing)}, then run "
            f"`sky check {' '.join(missing)}`"
        )
        if not enabled:
            raise NoCloudAccessError(f"SkyPilot has no cloud enabled for compute: {fix}")
        raise CredentialsError(
            f"SkyPilot cannot use {', '.join(missing)} (enabled: {', '.join(sorted(enabled))}): "
            f"{fix}"
        )

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        sky = import_sky()
        task = self.build_task(spec)
        cluster = cluster_name(spec.name)
        try:
            request_id = sky.launch(
                task,
                cluster_name=cluster,
                retry_until_up=False,
                idle_minutes_to_autostop=self.idle_minutes_to_autostop,
            )
            job_id, _ = sky.stream_and_get(request_id, output_stream=self.output_stream)
        except Exception as e:
            raise map_sky_error(e, spec) from e
        handle = ReplicaHandle(
            provider=self.name,
            name=spec.name,
            info={"cluster": cluster, "job_id": job_id, "port": self.port},
        )
        handle.url = self.endpoint(handle)
        if spec.data_parallel > 1:
            ports = self.ports(spec)
            handle.info["urls"] = [self.endpoint(handle, port) for port in ports]
        return handle

    def status(self, handle: ReplicaHandle) -> ReplicaState:
        sky = import_sky()
        cluster = cluster_name(handle.name)
        try:
            records = sky.get(sky.status([cluster], refresh=sky.StatusRefreshMode.AUTO))
        except Exception as e:
            raise map_sky_error(e, None) from e
        for record in records:
            if _field(record, "name") == cluster:
                return _state(_field(record, "status"))
        return ReplicaState.DEAD

    def terminate(self, handle: ReplicaHandle) -> None:
        sky = import_sky()
        try:
            sky.stream_and_get(
                sky.down(cluster_name(handle.name)), output_stream=self.output_stream
            )
        except sky.exceptions.ClusterDoesNotExist:
            return
        except Exception as e:
            raise map_sky_error(e, None) from e

    def endpoint(self, handle: ReplicaHandle, port: int | None = None) -> str:
        sky = import_sky()
        port = port or int(handle.info.get("port", self.port))
        try:
            found = sky.get(sky.endpoints(cluster_name(handle.name), port))
        except Exception as e:
            raise map_sky_error(e, None) from e
        url = found.get(port) or found.get(str(port))
        if not url:
            raise ProvisionError(f"SkyPilot exposes no endpoint for port {port} of {handle.name}")
        return url if "://" in url else f"http://{url}"

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        sky = import_sky()
        out = io.StringIO()
        try:
            sky.tail_logs(cluster_name(handle.name), None, False, tail=tail, output_stream=out)
        except Exception as e:
            raise map_sky_error(e, None) from e
        return out.getvalue()


def _field(record: Any, name: str) -> Any:
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


def _state(status: Any) -> ReplicaState:
    value = getattr(status, "value", status)
    return {
        "UP": ReplicaState.RUNNING,
        "INIT": ReplicaState.LAUNCHING,
        "STOPPED": ReplicaState.PREEMPTED,
    }.get(str(value), ReplicaState.DEAD)


def _describe(errors: list[BaseException]) -> str:
    return "; ".join(f"{type(e).__name__}: {e}" for e in errors)


def map_sky_error(e: BaseException, spec: ReplicaSpec | None) -> ProvisionError:
    """SkyPilot's exception as the broker's own error (CapacityError feeds failover)."""
    if isinstance(e, ProvisionError):
        return e
    from sky import exceptions as sx

    where = f" for {spec.name} on {'/'.join(map(str, spec.offering_key))}" if spec else ""
    credential_errors = (
        sx.InvalidCloudCredentials,
        sx.CloudUserIdentityError,
        sx.ClusterOwnerIdentityMismatchError,
    )
    if isinstance(e, sx.ProvisionPrechecksError):
        reasons = list(e.reasons)
        if reasons and all(isinstance(r, sx.ResourcesUnavailableError) for r in reasons):
            e = reasons[0]
        else:
            return ProvisionError(f"SkyPilot prechecks failed{where}: {_describe(reasons)}")
    if isinstance(e, sx.ResourcesUnavailableError):
        history = list(e.failover_history)
        if history and all(isinstance(h, credential_errors) for h in history):
            return CredentialsError(f"cloud credentials rejected{where}: {_describe(history)}")
        detail = _describe(history) if history else str(e)
        message = f"no capacity{where}: {detail}"
        if spec is None:
            return ProvisionError(message)
        return CapacityError(spec.offering_key, message)
    if isinstance(e, sx.NoCloudAccessError):
        return NoCloudAccessError(
            f"SkyPilot has no cloud enabled{where}: {e}. Configure credentials, then run "
            "`sky check`"
        )
    if isinstance(e, credential_errors):
        return CredentialsError(f"cloud credentials problem{where}: {e}")
    if isinstance(e, sx.ApiServerConnectionError):
        return ProvisionError(f"cannot reach the SkyPilot API server{where}: {e}")
    return ProvisionError(f"SkyPilot failed{where}: {type(e).__name__}: {e}")
