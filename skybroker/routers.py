"""Deployment routers as processes of their own, so an endpoint outlives the broker.

Each deployment's router is a `python -m skybroker.router` process in its own session (a
broker that dies or restarts does not take it along), recorded in
`$SKYBROKER_HOME/routers/<name>/router.json` (pid, start time, host, port) with its log
beside it. A restarted broker adopts a live one (same port, same replica set until the next
push) and starts one only where none answers. The controller pushes the replica set to it
(`PUT /router/replicas` with the router's admin key) and reads the in-flight counts back
when it drains a replica. `DeploymentRouters` is the controller's side of all that.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from skybroker.keys import endpoint_api_key, router_admin_key
from skybroker.provision.local import free_port, process_start_time, stop_recorded
from skybroker.replica_auth import replica_auth
from skybroker.router import (
    ADMIN_KEY_ENV,
    API_KEY_ENV,
    ReplicaTarget,
    Router,
    targets_json,
)
from skybroker.state import Deployment, Replica, ReplicaStatus, Store, default_home

_RECORD = "router.json"
_LOG = "router.log"


class RouterProcessError(RuntimeError):
    """A router process could not be started (the message names its log)."""


class RouterProcess:
    """The controller's handle on one deployment's router process."""

    def __init__(
        self,
        name: str,
        host: str,
        port: int,
        info: dict[str, Any],
    ) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.info = info  # pid, start_time
        self.admin_key = router_admin_key(name)
        self._http = httpx.Client(
            base_url=f"http://{_connect_host(host)}:{port}",
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=5.0,
        )

    def alive(self) -> bool:
        started = process_start_time(int(self.info["pid"]))
        return started is not None and started == self.info.get("start_time", started)

    def set_replicas(self, targets: list[ReplicaTarget]) -> bool:
        """Push the replica set; False if the router did not take it."""
        try:
            return self._http.put("/router/replicas", json=targets_json(targets)).is_success
        except httpx.HTTPError:
            return False

    def snapshot(self) -> list[dict[str, Any]]:
        """The router's replicas with their in-flight counts ([] if it does not answer)."""
        try:
            r = self._http.get("/router/replicas")
        except httpx.HTTPError:
            return []
        return r.json() if r.is_success else []

    def load(self, window_s: float) -> dict[str, Any] | None:
        """The router's load over the last `window_s` (None if it does not answer)."""
        try:
            r = self._http.get("/router/load", params={"window_s": window_s})
        except httpx.HTTPError:
            return None
        return r.json() if r.is_success else None

    def close(self) -> None:
        self._http.close()


def _connect_host(host: str) -> str:
    """Where this machine reaches a router bound to `host` (a wildcard: on loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class RouterProcesses:
    """Start, adopt and stop the router processes of deployments."""

    def __init__(self, home: Path | None = None, python: str = sys.executable) -> None:
        self.home = Path(home) if home else default_home()
        self.python = python

    def run_dir(self, name: str) -> Path:
        return self.home / "routers" / name

    def ensure(
        self,
        name: str,
        host: str,
        port: int | None,
        api_key: str,
        timeout_s: float = 30.0,
    ) -> RouterProcess:
        """The live router of `name` on (host, port), else a new one (on `port` while free)."""
        old = self._adopt(name, host, port)
        if old is not None:
            return old
        self.stop(name)
        run_dir = self.run_dir(name)
        run_dir.mkdir(parents=True, exist_ok=True)
        if port is None or not _free(host, port):
            port = free_port(host)
        env = {**os.environ, API_KEY_ENV: api_key, ADMIN_KEY_ENV: router_admin_key(name)}
        cmd = [self.python, "-m", "skybroker.router", "--name", name]
        cmd += ["--host", host, "--port", str(port)]
        with open(run_dir / _LOG, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # outlives the broker
                close_fds=True,
            )
        info = {"pid": proc.pid, "start_time": process_start_time(proc.pid)}
        info |= {"host": host, "port": port}
        (run_dir / _RECORD).write_text(json.dumps(info))
        router = RouterProcess(name, host, port, info)
        deadline = time.monotonic() + timeout_s
        while not _answers(router):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop(name)
                tail = (run_dir / _LOG).read_text(errors="replace").splitlines()[-5:]
                raise RouterProcessError(
                    f"the router of {name!r} did not start on {host}:{port}: " + " | ".join(tail)
                )
            time.sleep(0.05)
        return router

    def _adopt(self, name: str, host: str, port: int | None) -> RouterProcess | None:
        info = self._record(name)
        if info is None or info.get("host") != host or (port and info.get("port") != port):
            return None
        router = RouterProcess(name, host, int(info["port"]), info)
        if router.alive() and _answers(router):
            return router
        router.close()
        return None

    def _record(self, name: str) -> dict[str, Any] | None:
        try:
            return json.loads((self.run_dir(name) / _RECORD).read_text())
        except (OSError, ValueError):
            return None

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        """Stop the router of `name` (SIGTERM: in-flight requests finish; then SIGKILL)."""
        info = self._record(name)
        if info is not None:
            stop_recorded(info, timeout_s)
        with contextlib.suppress(FileNotFoundError):
            (self.run_dir(name) / _RECORD).unlink()


def _answers(router: RouterProcess) -> bool:
    """The router answers its admin route with this deployment's admin key."""
    try:
        r = router._http.get("/router/replicas", timeout=1.0)
    except httpx.HTTPError:
        return False
    return r.status_code == 200


def _free(host: str, port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def replica_targets(
    dep: Deployment,
    replicas: list[Replica],
    probed_at: dict[str, float],
    down: dict[str, set[int]] | None = None,
) -> list[ReplicaTarget]:
    """The router's view of a deployment's replicas: ready ones, draining ones (in-flight
    requests finish there), and the others it must not use yet. A replica running several
    engines (data parallel: `info.urls`) is one target per engine; `down` names the engines
    (by index) whose probes fail, which get nothing new though their replica is ready. Each
    carries the replica's key and, for HTTPS, its certificate."""
    targets = []
    for rep in replicas:
        if not rep.url or rep.status not in _ROUTED:
            continue
        auth = replica_auth(rep)
        t = dep.targets[rep.target] if rep.target < len(dep.targets) else {}
        urls = rep.engine_urls
        failing = (down or {}).get(rep.name, set())
        for i, url in enumerate(urls):
            targets.append(
                ReplicaTarget(
                    name=rep.name if i == 0 else f"{rep.name}/{i}",
                    url=url,
                    capacity_rps=float(t.get("capacity_rps") or 1.0) / len(urls),
                    ready=rep.status in (ReplicaStatus.READY, ReplicaStatus.DRAINING)
                    and i not in failing,
                    probed_at=probed_at.get(rep.name, 0.0),
                    draining=rep.status == ReplicaStatus.DRAINING,
                    api_key=auth.api_key,
                    tls_cert=auth.tls_cert,
                )
            )
    return targets


_ROUTED = (
    ReplicaStatus.STARTING,
    ReplicaStatus.READY,
    ReplicaStatus.NOT_READY,
    ReplicaStatus.DRAINING,
)


class DeploymentRouters:
    """Each deployment's router: a process of its own, or (serve=False) an in-process
    `Router` nobody serves, for checks of the controller's own logic."""

    def __init__(self, store: Store, host: str = "127.0.0.1", serve: bool = True) -> None:
        self.store = store
        self.host = host
        self.serve = serve
        self.procs = RouterProcesses()
        self._routers: dict[str, Router | RouterProcess] = {}

    def get(self, name: str) -> Router | RouterProcess | None:
        return self._routers.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._routers

    def start(self, dep: Deployment) -> Deployment:
        """The router of `dep`: its live process adopted, or a new one on its old port
        (another where that is taken: the deployment's row says which)."""
        if dep.name in self._routers:
            return dep
        key = endpoint_api_key(dep.name, dep.created_at)
        if not self.serve:
            self._routers[dep.name] = Router(dep.name, api_key=key)
            return dep
        router = self.procs.ensure(dep.name, self.host, dep.router_port, key)
        self._routers[dep.name] = router
        if router.port != dep.router_port or dep.router_host != self.host:
            dep = self.store.update_deployment(
                dep.name, router_port=router.port, router_host=self.host
            )
        return dep

    def push(self, dep: Deployment, targets: list[ReplicaTarget]) -> None:
        """Set the replica set; a router process found dead is started again first."""
        router = self._routers.get(dep.name)
        if router is None or router.set_replicas(targets) is not False:
            return
        assert isinstance(router, RouterProcess)
        if router.alive():
            return  # busy: the next pass pushes again
        self.store.add_event(dep.name, "router_restarted", "the router process was gone")
        router.close()
        self._routers.pop(dep.name)
        self.start(dep)
        self._routers[dep.name].set_replicas(targets)

    def in_flight(self, name: str, replicas: set[str]) -> int | None:
        """Requests the router has in flight on these replicas (None: it cannot tell)."""
        router = self._routers.get(name)
        if router is None:
            return None
        rows = router.snapshot()
        if not rows and isinstance(router, RouterProcess) and not router.alive():
            return None
        return sum(r["outstanding"] for r in rows if r["name"].split("/")[0] in replicas)

    def load(self, name: str, window_s: float) -> dict[str, Any] | None:
        """What the router of `name` saw over the last `window_s` (None: it cannot tell)."""
        router = self._routers.get(name)
        if router is None:
            return None
        if isinstance(router, RouterProcess):
            return router.load(window_s)
        return asyncio.run(router.load_report(window_s))

    def stop(self, name: str) -> None:
        """Stop the router of `name` for good (`down`)."""
        router = self._routers.pop(name, None)
        if isinstance(router, RouterProcess):
            router.close()
        if self.serve:
            self.procs.stop(name)

    def close(self) -> None:
        """Let go of the routers; their processes keep serving for the next broker."""
        for router in self._routers.values():
            if isinstance(router, RouterProcess):
                router.close()
        self._routers.clear()
