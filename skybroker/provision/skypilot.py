"""The SkyPilot provisioner: one SkyPilot cluster per replica, pinned to the planned offering.

The Task's setup installs the engine (the source tree of a checkout, else the wheel of the
installed skybroker, mounted into the Task), its run starts `python -m engine.serve`, which
fetches a hub model on the replica; the Resources are pinned to the plan's cloud, region,
instance type and market with the engine's port exposed. The engine serves HTTPS: each
launch makes a certificate and key of its own (`skybroker.tls`), the key travels as a
SkyPilot secret, and the certificate (public) is kept in the handle for the broker to pin.
Every call goes through SkyPilot's client SDK module (`sky.client.sdk`: `launch` returns a
request id, `stream_and_get` / `get` wait), never through names on the `sky` package that a
submodule import can shadow.
SkyPilot's exceptions become the broker's own (`CapacityError` feeds failover). `sky` is
imported lazily: the broker runs without it.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib.util
import inspect
import io
import re
import shlex
import threading
from pathlib import Path
from typing import Any, TextIO

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
from skybroker.tls import CertPair, self_signed

ENGINE_PORT = 8000
REMOTE_MODEL_DIR = "/skybroker/model"
REMOTE_WHEEL_DIR = "/skybroker/dist"
# The replica's TLS files, relative to the run's working directory; their contents arrive
# base64-encoded in these secrets (one line each, whatever the channel does to newlines).
REMOTE_TLS = (".skybroker-tls/cert.pem", ".skybroker-tls/key.pem")
TLS_SECRETS = ("SKYBROKER_TLS_CERT", "SKYBROKER_TLS_KEY")
_CLUSTER_PREFIX = "sb-"
# The SkyPilot releases this provisioner is tested with (pyproject's `cloud` extra pins the same).
SKYPILOT_RANGE = ">=0.14.1,<0.15"
# The SDK calls the provisioner makes, with the keyword arguments it passes.
SDK_CALLS: dict[str, tuple[str, ...]] = {
    "check": ("infra_list", "verbose"),
    "launch": ("task", "cluster_name", "retry_until_up", "idle_minutes_to_autostop", "dryrun"),
    "stream_and_get": ("request_id", "output_stream"),
    "get": ("request_id",),
    "status": ("cluster_names", "refresh"),
    "down": ("cluster_name",),
    "endpoints": ("cluster", "port"),
    "tail_logs": ("cluster_name", "job_id", "follow", "tail", "output_stream"),
    "api_cancel": ("request_ids", "silent"),
}


def import_sdk() -> Any:
    """SkyPilot's client SDK module, or a MissingExtraError that says how to install it."""
    try:
        from sky.client import sdk
    except ImportError as e:
        raise MissingExtraError(
            f"SkyPilot is not installed ({e}); infra 'skypilot' needs it: "
            "pip install 'skybroker[cloud]'"
        ) from e
    return sdk


def import_sky() -> Any:
    """The `sky` package (Task, Resources, exceptions), or a MissingExtraError."""
    import_sdk()
    import sky

    return sky


def missing_sdk_calls(sdk: Any) -> list[str]:
    """What the provisioner needs that this SDK lacks: `name` or `name(arg)`, [] when none."""
    missing = []
    for name, params in SDK_CALLS.items():
        fn = getattr(sdk, name, None)
        if not callable(fn) or inspect.ismodule(fn):
            missing.append(name)
            continue
        have = inspect.signature(fn).parameters
        missing += [f"{name}({p})" for p in params if p not in have]
    return missing


def check_sdk(sdk: Any) -> None:
    """Raise a ProvisionError naming the missing calls if this SkyPilot cannot serve us."""
    missing = missing_sdk_calls(sdk)
    if missing:
        version = getattr(import_sky(), "__version__", "?")
        raise ProvisionError(
            f"the installed SkyPilot {version} lacks {', '.join(missing)} in sky.client.sdk; "
            f"skybroker is tested with skypilot{SKYPILOT_RANGE}: "
            f"pip install 'skypilot{SKYPILOT_RANGE}'"
        )


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


def wheel_cache_dir() -> Path:
    from skybroker.state import default_home

    return default_home() / "wheels"


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
        launch_timeout_s: float | None = 1800.0,
        wheel: Path | None = None,
        tls: bool = True,
    ) -> None:
        """`workdir=True` uploads this project's source tree when it is one (a dev install);
        False or no tree found mounts the wheel of the installed skybroker (`wheel`, else one
        rebuilt from the installed distribution). A launch still running after
        `launch_timeout_s` is cancelled and fails (the controller then tears it down).
        `tls=False` serves plain HTTP (a private network the broker shares with its replicas)."""
        self.port = port
        self.workdir = project_root() if workdir is True else (workdir or None)
        self.extras = extras
        self.idle_minutes_to_autostop = idle_minutes_to_autostop
        self.output_stream = output_stream if output_stream is not None else io.StringIO()
        self.launch_timeout_s = launch_timeout_s
        self._wheel = wheel
        self.tls = tls

    # -- building the task --------------------------------------------------------------------

    def wheel(self) -> Path:
        """The local wheel the replica installs (built once from the installed skybroker)."""
        if self._wheel is None:
            from skybroker.provision.wheel import build_installed_wheel

            self._wheel = build_installed_wheel(wheel_cache_dir())
        return self._wheel

    def install(self) -> tuple[str, dict[str, str]]:
        """The setup command that installs the engine, and the file_mounts it needs."""
        if self.workdir is not None:
            return f"pip install -q -e '.[{self.extras}]'", {}
        local = self.wheel()
        remote = f"{REMOTE_WHEEL_DIR}/{local.name}"
        return f"pip install -q '{remote}[{self.extras}]'", {remote: str(local)}

    def model_mount(self, model: str) -> tuple[str, dict[str, str]]:
        """The model argument on the replica, and the file_mounts that bring a local model."""
        path = Path(model).expanduser()
        if not path.exists():
            return model, {}  # a hub id: engine.hub fetches it on the replica (HF_TOKEN secret)
        if path.is_dir():
            return REMOTE_MODEL_DIR, {REMOTE_MODEL_DIR: str(path.resolve())}
        remote = f"{REMOTE_MODEL_DIR}/{path.name}"
        return remote, {remote: str(path.resolve())}

    def ports(self, spec: ReplicaSpec) -> list[int]:
        return [self.port + i for i in range(max(1, spec.data_parallel))]

    def run_command(self, spec: ReplicaSpec, tls: bool = False) -> str:
        """One engine, or `data_parallel` engines each on its own GPUs and port; with `tls`
        the TLS files are written from their secrets first (0600) and every engine serves
        HTTPS with them."""
        ports = self.ports(spec)
        files = REMOTE_TLS if tls else None
        lines = [tls_files_command()] if tls else []
        if len(ports) == 1:
            lines.append(shell_join(engine_command(spec, "0.0.0.0", ports[0], tls=files)))
            return "\n".join(lines)
        tp = spec.tensor_parallel_size
        for i, port in enumerate(ports):
            gpus = ",".join(str(g) for g in range(i * tp, (i + 1) * tp))
            cmd = shell_join(engine_command(spec, "0.0.0.0", port, tls=files))
            lines.append(f"CUDA_VISIBLE_DEVICES={gpus} {cmd} &")
        return "\n".join([*lines, "wait"])

    def build_resources(self, spec: ReplicaSpec) -> Any:
        from sky import resources

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
        try:
            return resources.Resources(
                infra=f"{spec.cloud}/{spec.region}",
                instance_type=spec.instance_type,
                accelerators=accelerators,
                use_spot=spec.spot,
                ports=self.ports(spec),
            )
        except Exception as e:
            raise map_sky_error(e, spec, "sky.Resources") from e

    def build_task(self, spec: ReplicaSpec, tls: CertPair | None = None) -> Any:
        """The sky.Task of one replica (secrets go to SkyPilot's `secrets`, never to envs);
        with `tls` its engines serve HTTPS with that certificate and key."""
        import_sdk()
        from sky import task as sky_task

        secrets = dict(spec.secrets)
        if tls is not None:
            secrets |= tls_secrets(tls)
        model, model_mounts = self.model_mount(spec.model)
        setup, install_mounts = self.install()
        remote = dataclasses.replace(spec, model=model)
        resources = self.build_resources(spec)
        try:
            task = sky_task.Task(
                name=cluster_name(spec.name),
                setup=setup,
                run=self.run_command(remote, tls=tls is not None),
                envs=dict(spec.envs),
                secrets=secrets or None,
                workdir=str(self.workdir) if self.workdir else None,
                file_mounts={**install_mounts, **model_mounts} or None,
            )
            task.set_resources(resources)
        except Exception as e:
            raise map_sky_error(e, spec, "sky.Task") from e
        return task

    # -- the Provisioner interface ------------------------------------------------------------

    def check(self, clouds: set[str]) -> None:
        """Raise unless SkyPilot is installed and can use every cloud in `clouds` (`sky check`
        through its API server); the error says what to install or configure."""
        sdk = import_sdk()
        check_sdk(sdk)
        wanted = sorted(c.lower() for c in clouds)
        if "local" in wanted:
            raise ProvisionError("the plan runs on this machine (cloud 'local'): use infra: local")
        try:
            result = sdk.get(sdk.check(tuple(wanted), verbose=False)) or {}
        except Exception as e:
            raise map_sky_error(e, None, "sky check") from e
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

    def dry_run(self, spec: ReplicaSpec) -> dict[str, Any]:
        """Build the replica's Task and have SkyPilot validate it (`sky launch --dryrun`:
        its optimizer resolves the pinned offering against its catalog); launches nothing.
        Returns the Task as SkyPilot's YAML, secrets masked."""
        sdk = import_sdk()
        task = self.build_task(spec, self._cert(spec))
        try:
            request_id = sdk.launch(task, cluster_name=cluster_name(spec.name), dryrun=True)
            sdk.stream_and_get(request_id, output_stream=self.output_stream)
        except Exception as e:
            raise map_sky_error(e, spec, "sky launch --dryrun") from e
        config = task.to_yaml_config()
        if config.get("secrets"):
            config["secrets"] = {k: "<secret>" for k in config["secrets"]}
        return {"cluster": cluster_name(spec.name), "task": config}

    def _cert(self, spec: ReplicaSpec) -> CertPair | None:
        """A new certificate and key for this launch (None: plain HTTP)."""
        return self_signed(cluster_name(spec.name)) if self.tls else None

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        sdk = import_sdk()
        cert = self._cert(spec)
        task = self.build_task(spec, cert)
        cluster = cluster_name(spec.name)
        try:
            request_id = sdk.launch(
                task,
                cluster_name=cluster,
                retry_until_up=False,
                idle_minutes_to_autostop=self.idle_minutes_to_autostop,
            )
        except Exception as e:
            raise map_sky_error(e, spec, "sky launch") from e
        job_id, _ = self._wait(sdk, request_id, spec)
        handle = ReplicaHandle(
            provider=self.name,
            name=spec.name,
            info={"cluster": cluster, "job_id": job_id, "port": self.port},
        )
        if cert is not None:
            handle.info["tls_cert"] = cert.cert_pem
        handle.url = self.endpoint(handle)
        if spec.data_parallel > 1:
            ports = self.ports(spec)
            handle.info["urls"] = [self.endpoint(handle, port) for port in ports]
        return handle

    def _wait(self, sdk: Any, request_id: Any, spec: ReplicaSpec) -> Any:
        """The launch request's result, streaming its log; cancelled past the timeout."""
        outcome: dict[str, Any] = {}

        def stream() -> None:
            try:
                outcome["result"] = sdk.stream_and_get(request_id, output_stream=self.output_stream)
            except BaseException as e:
                outcome["error"] = e

        waiter = threading.Thread(target=stream, name=f"sky-launch-{spec.name}", daemon=True)
        waiter.start()
        waiter.join(self.launch_timeout_s)
        if waiter.is_alive():
            try:
                sdk.get(sdk.api_cancel(request_id, silent=True))
            except Exception as e:
                raise map_sky_error(e, spec, "sky api cancel") from e
            waiter.join(60)
            raise ProvisionError(
                f"sky launch of {spec.name} on {'/'.join(map(str, spec.offering_key))} "
                f"was not up after {self.launch_timeout_s:.0f}s; cancelled it"
            )
        if "error" in outcome:
            raise map_sky_error(outcome["error"], spec, "sky launch") from outcome["error"]
        return outcome["result"]

    def status(self, handle: ReplicaHandle) -> ReplicaState:
        sdk = import_sdk()
        from sky.utils import common

        cluster = cluster_name(handle.name)
        try:
            records = sdk.get(sdk.status([cluster], refresh=common.StatusRefreshMode.AUTO))
        except Exception as e:
            raise map_sky_error(e, None, "sky status") from e
        for record in records:
            if _field(record, "name") == cluster:
                return _state(_field(record, "status"))
        return ReplicaState.DEAD

    def terminate(self, handle: ReplicaHandle) -> None:
        sdk = import_sdk()
        from sky import exceptions as sx

        try:
            sdk.stream_and_get(
                sdk.down(cluster_name(handle.name)), output_stream=self.output_stream
            )
        except sx.ClusterDoesNotExist:
            return
        except Exception as e:
            raise map_sky_error(e, None, "sky down") from e

    def endpoint(self, handle: ReplicaHandle, port: int | None = None) -> str:
        sdk = import_sdk()
        port = port or int(handle.info.get("port", self.port))
        try:
            found = sdk.get(sdk.endpoints(cluster_name(handle.name), port))
        except Exception as e:
            raise map_sky_error(e, None, "sky status --endpoint") from e
        url = found.get(port) or found.get(str(port))
        if not url:
            raise ProvisionError(f"SkyPilot exposes no endpoint for port {port} of {handle.name}")
        scheme = "https" if handle.info.get("tls_cert") else "http"
        return f"{scheme}://{url.split('://', 1)[-1]}"

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        sdk = import_sdk()
        out = io.StringIO()
        try:
            sdk.tail_logs(cluster_name(handle.name), None, False, tail=tail, output_stream=out)
        except Exception as e:
            raise map_sky_error(e, None, "sky logs") from e
        return out.getvalue()


def tls_secrets(pair: CertPair) -> dict[str, str]:
    """The certificate and key as the replica's secrets (base64 of the PEM, one line each)."""
    return {
        name: base64.b64encode(pem.encode()).decode()
        for name, pem in zip(TLS_SECRETS, (pair.cert_pem, pair.key_pem), strict=True)
    }


def tls_files_command() -> str:
    """Shell that writes the TLS files from their secrets, readable by the owner only."""
    writes = [
        f'echo "${name}" | base64 -d > {shlex.quote(path)}'
        for name, path in zip(TLS_SECRETS, REMOTE_TLS, strict=True)
    ]
    folder = shlex.quote(str(Path(REMOTE_TLS[0]).parent))
    return f"(umask 077 && mkdir -p {folder} && {' && '.join(writes)})"


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


def map_sky_error(
    e: BaseException, spec: ReplicaSpec | None, call: str = "SkyPilot"
) -> ProvisionError:
    """SkyPilot's exception as the broker's own error (CapacityError feeds failover).

    Errors a user can act on say what to do; any other names `call` and SkyPilot's message.
    """
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
            return ProvisionError(f"{call}: SkyPilot prechecks failed{where}: {_describe(reasons)}")
    if isinstance(e, sx.ResourcesUnavailableError):
        history = list(e.failover_history)
        if history and all(isinstance(h, credential_errors) for h in history):
            return CredentialsError(
                f"cloud credentials rejected{where}: {_describe(history)}. "
                "Fix them, then run `sky check`"
            )
        detail = _describe(history) if history else str(e)
        message = f"no capacity{where}: {detail}"
        if spec is None:
            return ProvisionError(f"{call}: {message}")
        return CapacityError(spec.offering_key, message)
    if isinstance(e, sx.NoCloudAccessError):
        return NoCloudAccessError(
            f"SkyPilot has no cloud enabled{where}: {e}. Configure credentials, then run "
            "`sky check`"
        )
    if isinstance(e, credential_errors):
        return CredentialsError(
            f"cloud credentials problem{where}: {e}. Fix them, then run `sky check`"
        )
    if isinstance(e, sx.ApiServerConnectionError):
        return ProvisionError(
            f"cannot reach the SkyPilot API server{where}: {e}. Start it with `sky api start` "
            "or point SKYPILOT_API_SERVER_ENDPOINT at yours"
        )
    if isinstance(e, sx.RequestCancelled):
        return ProvisionError(f"{call} was cancelled{where}: {e}")
    return ProvisionError(f"{call} failed{where}: {type(e).__name__}: {e}")
