"""The SkyPilot provisioner: one SkyPilot cluster per replica, pinned to the planned offering.

The Task's setup picks a Python >= 3.11 and installs the engine (the source tree of a
checkout, else the wheel of the installed skybroker, mounted into the Task); its run starts
`engine.serve`, which fetches a hub model on the replica (`sky_setup`). The Resources are
pinned to the plan's cloud, region, instance type and market with the engine's ports exposed,
and labelled with the broker and replica they belong to (`sky_names`). Every call goes
through SkyPilot's client SDK module (`sky.client.sdk`: `launch` returns a request id,
`stream_and_get` / `get` wait; `sky_sdk`), never through names on the `sky` package that a
submodule import can shadow. A replica's state comes from its cluster's record and its job
(`sky_watch`, by the rules in `sky_jobs`): a reclaimed spot cluster is PREEMPTED, a job that
ended is FAILED. Launch requests are recorded under $SKYBROKER_HOME so a restarted broker
cancels them (`reconcile_launch`, `terminate`) and downs clusters no replica owns (`sweep`).
The engine serves HTTPS: each launch makes a certificate and key of its own
(`skybroker.tls`), the key travels as a SkyPilot secret, and the certificate (public) is kept
in the handle for the broker to pin.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import importlib.util
import io
import json
import shlex
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from skybroker.provision import (
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    sky_jobs,
    sky_names,
    sky_setup,
)
from skybroker.provision.sky_sdk import (  # noqa: F401  (re-exported)
    SDK_CALLS,
    SKYPILOT_RANGE,
    check_sdk,
    import_sdk,
    import_sky,
    map_sky_error,
    missing_sdk_calls,
)
from skybroker.provision.sky_watch import Seen, SkyWatch
from skybroker.tls import CertPair, self_signed

ENGINE_PORT = 8000
REMOTE_MODEL_DIR = "/skybroker/model"
REMOTE_WHEEL_DIR = "/skybroker/dist"
# The replica's TLS files, relative to the run's working directory; their contents arrive
# base64-encoded in these secrets (one line each, whatever the channel does to newlines).
REMOTE_TLS = (".skybroker-tls/cert.pem", ".skybroker-tls/key.pem")
TLS_SECRETS = ("SKYBROKER_TLS_CERT", "SKYBROKER_TLS_KEY")
_LIVE_REQUESTS = ("PENDING", "RUNNING")


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


class SkyPilotProvisioner(SkyWatch):
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
        home: Path | None = None,
        broker: str | None = None,
        endpoint_wait_s: float = 120.0,
        job_poll_s: float = 10.0,
        log_limit: int = 64 * 1024,
    ) -> None:
        """`workdir=True` uploads this project's source tree when it is one (a dev install);
        False or no tree found mounts the wheel of the installed skybroker (`wheel`, else one
        rebuilt from the installed distribution). A launch still running after
        `launch_timeout_s` is cancelled and fails (the controller then tears it down).
        `tls=False` serves plain HTTP (a private network the broker shares with its replicas).
        `home` ($SKYBROKER_HOME) keeps the broker id (`broker` overrides it) and the launch
        requests in flight. SkyPilot's output goes to `output_stream` when given, else to one
        bounded buffer per replica (`launch_log`, the last `log_limit` characters)."""
        self.port = port
        self.workdir = project_root() if workdir is True else (workdir or None)
        self.extras = extras
        self.idle_minutes_to_autostop = idle_minutes_to_autostop
        self.output_stream = output_stream
        self.launch_timeout_s = launch_timeout_s
        self.endpoint_wait_s = endpoint_wait_s
        self.job_poll_s = job_poll_s
        self.log_limit = log_limit
        self._wheel = wheel
        self.tls = tls
        self._home = home
        self._broker = broker
        self._logs: dict[str, sky_jobs.RingLog] = {}
        self._seen: dict[str, Seen] = {}

    # -- names and records --------------------------------------------------------------------

    @property
    def home(self) -> Path:
        if self._home is None:
            from skybroker.state import default_home

            self._home = default_home()
        return self._home

    @property
    def broker(self) -> str:
        if self._broker is None:
            self._broker = sky_names.broker_id(self.home)
        return self._broker

    def cluster_of(self, replica: str) -> str:
        return sky_names.cluster_name(replica, self.broker)

    def _sdk(self) -> Any:
        return import_sdk()

    def _cluster(self, handle: ReplicaHandle) -> str:
        return str(handle.info.get("cluster") or self.cluster_of(handle.name))

    def _stream(self, replica: str) -> TextIO:
        if self.output_stream is not None:
            return self.output_stream
        return self._logs.setdefault(replica, sky_jobs.RingLog(self.log_limit))  # type: ignore[return-value]

    def launch_log(self, replica: str) -> str:
        """The last `log_limit` characters SkyPilot printed for this replica's calls."""
        found = self._logs.get(replica)
        return found.getvalue() if found else ""

    def _launch_file(self, cluster: str) -> Path:
        return self.home / "skypilot" / "launches" / f"{cluster}.json"

    def _record_launch(self, cluster: str, replica: str, request_id: str) -> None:
        """Written as soon as SkyPilot accepts the launch, so a broker restarted mid-launch
        can cancel it (`reconcile_launch`, `sweep`)."""
        path = self._launch_file(cluster)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"request_id": str(request_id), "replica": replica}))

    def _launch_record(self, cluster: str) -> dict[str, Any] | None:
        try:
            return json.loads(self._launch_file(cluster).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    # -- building the task --------------------------------------------------------------------

    def wheel(self) -> Path:
        """The local wheel the replica installs (built once from the installed skybroker)."""
        if self._wheel is None:
            from skybroker.provision.wheel import build_installed_wheel

            self._wheel = build_installed_wheel(wheel_cache_dir())
        return self._wheel

    def install(self) -> tuple[str, dict[str, str]]:
        """The setup script that installs the engine, and the file_mounts it needs."""
        if self.workdir is not None:
            return sky_setup.setup_script(f"-e '.[{self.extras}]'"), {}
        local = self.wheel()
        remote = f"{REMOTE_WHEEL_DIR}/{local.name}"
        return sky_setup.setup_script(f"'{remote}[{self.extras}]'"), {remote: str(local)}

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
        script = sky_setup.run_script(spec, self.ports(spec), tls=REMOTE_TLS if tls else None)
        return f"{tls_files_command()}\n{script}" if tls else script

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
                labels=sky_names.labels(spec.name, self.broker),
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
                name=self.cluster_of(spec.name),
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

    def startup_deadline_s(self, spec: ReplicaSpec) -> float:
        """How long the replica may take from launched to healthy (install, download, load)."""
        return sky_setup.startup_deadline_s(spec)

    # -- the Provisioner interface ------------------------------------------------------------

    def check(self, clouds: set[str]) -> None:
        """Raise unless SkyPilot is installed and can use every cloud in `clouds` (`sky check`
        through its API server); the error says what to install or configure."""
        from skybroker.provision.sky_sdk import check_clouds

        check_clouds(clouds)

    def dry_run(self, spec: ReplicaSpec) -> dict[str, Any]:
        """Build the replica's Task and have SkyPilot validate it (`sky launch --dryrun`:
        its optimizer resolves the pinned offering against its catalog); launches nothing.
        Returns the Task as SkyPilot's YAML, secrets masked."""
        sdk = import_sdk()
        task = self.build_task(spec, self._cert(spec))
        cluster = self.cluster_of(spec.name)
        try:
            request_id = sdk.launch(task, cluster_name=cluster, dryrun=True)
            sdk.stream_and_get(request_id, output_stream=self._stream(spec.name))
        except Exception as e:
            raise map_sky_error(e, spec, "sky launch --dryrun") from e
        finally:
            self._logs.pop(spec.name, None)
        config = task.to_yaml_config()
        if config.get("secrets"):
            config["secrets"] = {k: "<secret>" for k in config["secrets"]}
        return {"cluster": cluster, "task": config}

    def _cert(self, spec: ReplicaSpec) -> CertPair | None:
        """A new certificate and key for this launch (None: plain HTTP)."""
        return self_signed(self.cluster_of(spec.name)) if self.tls else None

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        sdk = import_sdk()
        cert = self._cert(spec)
        task = self.build_task(spec, cert)
        cluster = self.cluster_of(spec.name)
        self._refuse_foreign(cluster, spec.name, "reuse")
        self._seen.pop(spec.name, None)
        self._logs.pop(spec.name, None)
        try:
            request_id = sdk.launch(
                task,
                cluster_name=cluster,
                retry_until_up=False,
                idle_minutes_to_autostop=self.idle_minutes_to_autostop,
            )
        except Exception as e:
            raise map_sky_error(e, spec, "sky launch") from e
        self._record_launch(cluster, spec.name, request_id)
        job_id, _ = self._wait(sdk, request_id, spec)
        handle = ReplicaHandle(
            provider=self.name,
            name=spec.name,
            info={
                "cluster": cluster,
                "job_id": job_id,
                "port": self.port,
                "request_id": str(request_id),
                "spot": spec.spot,
                "seen_up": True,  # sky launch returns once the cluster is UP
            },
        )
        if cert is not None:
            handle.info["tls_cert"] = cert.cert_pem
        handle.url = self.endpoint(handle)
        if spec.data_parallel > 1:
            handle.info["urls"] = [self.endpoint(handle, port) for port in self.ports(spec)]
        return handle

    def _wait(self, sdk: Any, request_id: Any, spec: ReplicaSpec) -> Any:
        """The launch request's result, streaming its log; cancelled past the timeout."""
        outcome: dict[str, Any] = {}
        stream_to = self._stream(spec.name)

        def stream() -> None:
            try:
                outcome["result"] = sdk.stream_and_get(request_id, output_stream=stream_to)
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

    # -- teardown, adoption, leaks --------------------------------------------------------------

    def _refuse_foreign(self, cluster: str, replica: str | None, what: str) -> Any:
        """The cluster's record (None: no such cluster); raise if its labels say another
        broker, or another replica than `replica` (None: any of this broker's), owns it."""
        records = self._records([cluster], "NONE")
        records = [r for r in records if sky_names.field_of(r, "name") == cluster]
        if not records:
            return None
        broker, rhash = sky_names.owner_of(records[0])
        if (broker, rhash) == (None, None):
            return records[0]  # unlabelled: the name carries this broker's id
        if broker != self.broker or (
            replica is not None and rhash != sky_names.replica_hash(replica)
        ):
            whose = f"replica {replica} of this broker" if replica else "this broker"
            raise ProvisionError(
                f"SkyPilot cluster {cluster} belongs to broker {broker!r} (replica hash "
                f"{rhash!r}), not to {whose} ({self.broker}): refusing to {what} it"
            )
        return records[0]

    def _down(self, cluster: str, replica: str | None, log_key: str) -> None:
        sdk = import_sdk()
        from sky import exceptions as sx

        if self._refuse_foreign(cluster, replica, "down") is None:
            return
        try:
            sdk.stream_and_get(sdk.down(cluster), output_stream=self._stream(log_key))
        except sx.ClusterDoesNotExist:
            pass
        except Exception as e:
            raise map_sky_error(e, None, "sky down") from e

    def reconcile_launch(self, handle: ReplicaHandle) -> str | None:
        """Cancel this replica's launch request if it is still queued or running in SkyPilot's
        API server (a broker that restarted mid-launch); says what it did, None if nothing."""
        cluster = self._cluster(handle)
        record = self._launch_record(cluster) or {}
        request_id = handle.info.get("request_id") or record.get("request_id")
        if not request_id:
            return None
        return self._cancel_if_live(str(request_id))

    def _cancel_if_live(self, request_id: str) -> str | None:
        sdk = import_sdk()
        try:
            found = sdk.api_status([request_id])
        except Exception as e:
            raise map_sky_error(e, None, "sky api status") from e
        live = [r for r in found if sky_jobs.value(_payload(r, "status")) in _LIVE_REQUESTS]
        if not live:
            return None
        try:
            sdk.get(sdk.api_cancel(request_id, silent=True))
        except Exception as e:
            raise map_sky_error(e, None, "sky api cancel") from e
        return (
            f"cancelled launch request {request_id} ({sky_jobs.value(_payload(live[0], 'status'))})"
        )

    def terminate(self, handle: ReplicaHandle) -> None:
        """Cancel the replica's launch if one is in flight, then `sky down` its cluster
        (unless its labels say another broker or replica owns it); idempotent."""
        cluster = self._cluster(handle)
        self.reconcile_launch(handle)
        self._down(cluster, handle.name, handle.name)
        with contextlib.suppress(FileNotFoundError):
            self._launch_file(cluster).unlink()
        self._logs.pop(handle.name, None)  # _seen stays: failure() may be asked after

    def sweep(self, known_names: set[str] | list[str]) -> list[str]:
        """Down the clusters with this broker's name prefix whose replica the store does not
        know (`known_names`: replica names), and cancel launches in flight for unknown
        replicas; returns the clusters it took down or whose launch it cancelled."""
        known = {self.cluster_of(n) for n in known_names}
        prefix = sky_names.broker_prefix(self.broker)
        gone: list[str] = []
        launches = self.home / "skypilot" / "launches"
        stale = [p for p in sorted(launches.glob("*.json")) if p.stem not in known]
        for path in stale:
            request_id = (self._launch_record(path.stem) or {}).get("request_id")
            if request_id and self._cancel_if_live(str(request_id)):
                gone.append(path.stem)
        for record in self._records(None, "NONE"):
            cluster = str(sky_names.field_of(record, "name"))
            broker, _ = sky_names.owner_of(record)
            if (
                not cluster.startswith(prefix)
                or cluster in known
                or broker not in (None, self.broker)
            ):
                continue
            self._down(cluster, None, cluster)
            self._logs.pop(cluster, None)
            if cluster not in gone:
                gone.append(cluster)
        for path in stale:  # no live replica will ever finish these launches
            path.unlink(missing_ok=True)
        return gone

    # -- endpoints and logs ---------------------------------------------------------------------

    def endpoint(self, handle: ReplicaHandle, port: int | None = None) -> str:
        """The engine's URL; waits up to `endpoint_wait_s` while SkyPilot has not exposed the
        port yet (`sky.endpoints` answers {} until then)."""
        sdk = import_sdk()
        port = port or int(handle.info.get("port", self.port))
        deadline = time.monotonic() + self.endpoint_wait_s
        while True:
            try:
                found = sdk.get(sdk.endpoints(self._cluster(handle), port)) or {}
            except Exception as e:
                raise map_sky_error(e, None, "sky status --endpoint") from e
            url = found.get(port) or found.get(str(port))
            if url:
                scheme = "https" if handle.info.get("tls_cert") else "http"
                return f"{scheme}://{url.split('://', 1)[-1]}"
            if time.monotonic() >= deadline:
                raise ProvisionError(
                    f"SkyPilot exposed no endpoint for port {port} of {handle.name} within "
                    f"{self.endpoint_wait_s:.0f}s"
                )
            time.sleep(min(2.0, max(0.0, deadline - time.monotonic())))

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        sdk = import_sdk()
        out = io.StringIO()
        job_id = handle.info.get("job_id")
        try:
            sdk.tail_logs(
                self._cluster(handle),
                int(job_id) if job_id is not None else None,
                False,
                tail=tail,
                output_stream=out,
            )
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


def _payload(request: Any, name: str) -> Any:
    return request.get(name) if isinstance(request, dict) else getattr(request, name, None)
