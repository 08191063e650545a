"""Provisioners: turn one planned replica into a running engine server, and take it down.

One interface (`Provisioner`), two implementations: `local` (an engine process on this
machine) and `skypilot` (a SkyPilot cluster pinned to the planned offering). The controller
talks only to this interface; the broker's own errors below are what it handles.

A replica is known by its `name` alone: `terminate` and `status` work from a handle that
holds only the name, so a launch that died half-way can still be cleaned up.
"""

from __future__ import annotations

import logging
import shlex
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger(__name__)
OfferingKey = tuple[str, str, str, bool]  # (cloud, region, instance_type, spot)


class ProvisionError(Exception):
    """A replica could not be launched or managed; the message is for a person."""


class CapacityError(ProvisionError):
    """The offering has no capacity now (stockout, quota, preempted at launch): fail over."""

    def __init__(self, offering_key: OfferingKey, message: str) -> None:
        super().__init__(message)
        self.offering_key = offering_key


class NoCloudAccessError(ProvisionError):
    """No cloud is enabled for the provisioner (e.g. SkyPilot has no credentials at all)."""


class CredentialsError(ProvisionError):
    """A cloud's credentials are missing, invalid or of the wrong identity."""


class MissingExtraError(ProvisionError):
    """An optional dependency is not installed; the message says which pip extra to add."""


class ReplicaState(StrEnum):
    """What a provisioner sees of a replica (health of the engine is the controller's probe)."""

    RUNNING = "RUNNING"  # the machine/process is up (the engine may still be loading)
    LAUNCHING = "LAUNCHING"  # the provider is still provisioning it
    PREEMPTED = "PREEMPTED"  # the provider took it away (spot reclaim): replace, do not count
    FAILED = "FAILED"  # the machine is up but the replica's job ended (setup or engine exit)
    DEAD = "DEAD"  # gone: exited, crashed, or never existed


@dataclass
class ReplicaSpec:
    """Everything needed to start one engine server replica of a deployment."""

    name: str  # unique and stable, e.g. "<deployment>-<id>"
    deployment: str
    model: str  # local HF dir / .gguf file, or a hub id
    served_model_name: str
    cloud: str = "local"
    region: str = "local"
    instance_type: str = "localhost"
    spot: bool = False
    gpu: str | None = None
    gpu_count: int = 0
    tensor_parallel_size: int = 1
    data_parallel: int = 1  # engines per instance, each on tensor_parallel_size GPUs
    port: int | None = None  # None: the provisioner chooses
    engine_args: dict[str, Any] = field(default_factory=dict)  # --max-model-len ... by name
    envs: dict[str, str] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)  # API keys, hub tokens: never stored

    @property
    def offering_key(self) -> OfferingKey:
        return (self.cloud, self.region, self.instance_type, self.spot)


@dataclass
class ReplicaHandle:
    """How to find a launched replica again (JSON-able; holds no secrets)."""

    provider: str  # "local" | "skypilot"
    name: str
    url: str | None = None  # engine base URL, e.g. http://127.0.0.1:8123
    # provider's own: pid, cluster, log ...; `tls_cert` (PEM, public) for an https URL: the
    # one certificate the engine may show (skybroker.tls)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReplicaHandle:
        return cls(provider=d["provider"], name=d["name"], url=d.get("url"), info=d.get("info", {}))


@runtime_checkable
class Provisioner(Protocol):
    """Launch, inspect and tear down engine replicas on one kind of infrastructure."""

    name: str

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        """Start the replica and return once it runs (the engine may still be loading)."""
        ...

    def status(self, handle: ReplicaHandle) -> ReplicaState: ...

    def terminate(self, handle: ReplicaHandle) -> None:
        """Tear the replica down; idempotent, and works from a handle holding only the name."""
        ...

    def endpoint(self, handle: ReplicaHandle) -> str:
        """The engine's base URL (scheme://host:port, no path)."""
        ...

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        """The last lines of the replica's engine log."""
        ...

    # Optional (the controller uses them when present):
    # - `check(clouds: set[str]) -> None` raises a ProvisionError naming what is missing (an
    #   extra, credentials) before anything is recorded;
    # - `exit_code(handle) -> int | None`: the engine's (or the replica job's) exit status;
    # - `statuses(handles: list[ReplicaHandle]) -> dict[str, ReplicaState]`: many replicas'
    #   states in one query, keyed by handle name (a name missing from the answer: unknown);
    # - `failure(handle) -> str | None`: why a FAILED or DEAD replica ended, for a person
    #   (the job's state and exit code, the log tail);
    # - `startup_deadline_s(spec: ReplicaSpec) -> float`: how long this replica may take from
    #   launch to its first healthy probe (install, model download and load);
    # - `progress(handle) -> str | None`: a marker that changes while a starting replica makes
    #   progress (its log's length, the job's phase); the controller extends the deadline
    #   while it changes;
    # - `reconcile_launch(handle) -> str | None`: cancel the replica's launch if the provider
    #   still runs or queues it (a broker restarted mid-launch); says what it did. `terminate`
    #   does it too, first;
    # - `sweep(known_names) -> list[str]`: take down what the provider runs for this broker
    #   under a name the store does not know (called on adoption: `sweep_unknown`).


def engine_command(
    spec: ReplicaSpec,
    host: str,
    port: int,
    python: str = "python",
    tls: tuple[str, str] | None = None,
) -> list[str]:
    """The `python -m engine.serve ...` command line of a replica (see engine/serve); with
    `tls` (certificate file, key file) it serves HTTPS."""
    cmd = [python, "-m", "engine.serve", "--model", spec.model]
    cmd += ["--served-model-name", spec.served_model_name, "--host", host, "--port", str(port)]
    if tls is not None:
        cmd += ["--ssl-certfile", tls[0], "--ssl-keyfile", tls[1]]
    if spec.tensor_parallel_size != 1:
        cmd += ["--tensor-parallel-size", str(spec.tensor_parallel_size)]
    for key, value in sorted(spec.engine_args.items()):
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    return cmd


def shell_join(cmd: list[str]) -> str:
    return " ".join(shlex.quote(c) for c in cmd)


def sweep_unknown(provisioners: Iterable[Provisioner], store: Any) -> dict[str, list[str]]:
    """After a broker (re)start: each provisioner that has `sweep(known_names)` takes down
    what it runs for this broker that the store does not know as a live replica (a launch
    that finished after the broker died). Returns what each swept; errors are logged."""
    known = {
        r.name
        for d in store.list_deployments()
        for r in store.list_replicas(d.name)
        if str(r.status) not in ("TERMINATED", "FAILED")
    }
    swept: dict[str, list[str]] = {}
    for prov in provisioners:
        sweep = getattr(prov, "sweep", None)
        if sweep is None:
            continue
        try:
            swept[prov.name] = sweep(known)
        except ProvisionError as e:
            log.error("cannot sweep %s for unknown replicas: %s", prov.name, e)
            continue
        if swept[prov.name]:
            log.warning("took down %s: no live replica of this broker", swept[prov.name])
    return swept


def get_provisioner(infra: str, **kwargs: Any) -> Provisioner:
    """The provisioner for a spec's `infra` ("local" | "skypilot")."""
    if infra == "local":
        from skybroker.provision.local import LocalProvisioner

        return LocalProvisioner(**kwargs)
    if infra == "skypilot":
        from skybroker.provision.skypilot import SkyPilotProvisioner

        return SkyPilotProvisioner(**kwargs)
    raise ValueError(f"unknown infra {infra!r}; allowed: 'local', 'skypilot'")


__all__ = [
    "CapacityError",
    "CredentialsError",
    "MissingExtraError",
    "NoCloudAccessError",
    "OfferingKey",
    "ProvisionError",
    "Provisioner",
    "ReplicaHandle",
    "ReplicaSpec",
    "ReplicaState",
    "engine_command",
    "get_provisioner",
    "shell_join",
    "sweep_unknown",
]
