"""The local provisioner: each replica is a `python -m engine.serve` process on this machine.

Each replica gets a free port, a run directory `$SKYBROKER_HOME/replicas/<name>/` with its log
(`engine.log`) and a record (`replica.json`: pid, start time, port), and its own process group
(start_new_session), so terminating it kills the engine and anything it spawned. The record
is written the moment the process exists, so a broker that dies mid-launch leaves nothing a
later `terminate(name)` cannot find.

Replicas serve plain HTTP on loopback; with `tls=True` each gets a certificate of its own
(`tls.pem` and `tls.key`, 0600, in its run directory) and serves HTTPS, the certificate in its
handle for the broker to pin, as a cloud replica does.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from skybroker.provision import (
    MissingExtraError,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    engine_command,
)
from skybroker.state import default_home

_RECORD = "replica.json"
_LOG = "engine.log"
_PREEMPTED = "preempted"  # marker: `preempt` took the replica away
_CERT, _KEY = "tls.pem", "tls.key"


def _write_tls(run_dir: Path, name: str) -> str:
    """A fresh certificate and key for replica `name` in its run directory (the key 0600);
    returns the certificate (PEM)."""
    from skybroker.tls import self_signed

    pair = self_signed(name)
    for file, text, mode in ((_CERT, pair.cert_pem, 0o644), (_KEY, pair.key_pem, 0o600)):
        path = run_dir / file
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    return pair.cert_pem


def _url(host: str, port: int, info: dict[str, Any]) -> str:
    return f"{'https' if info.get('tls_cert') else 'http'}://{host}:{port}"


LOCAL_BASE_S = 120.0  # interpreter, torch import, warm-up
LOCAL_LOAD_BYTES_PER_S = 100e6  # weights from local disk, converted on the CPU
LOCAL_MIN_DEADLINE_S = 300.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of a live process (clock ticks since boot), None if gone.

    Comparing it to the recorded one tells a live replica from a reused pid. Zombies count as
    gone. Off Linux (no /proc) it returns 0 for any live pid.
    """
    stat = Path(f"/proc/{pid}/stat")
    if not Path("/proc/self/stat").exists():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            return 0
        return 0
    try:
        text = stat.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # field 22 of stat: starttime


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in process group `pgid`."""
    proc = Path("/proc")
    if not (proc / "self" / "stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def stop_recorded(info: dict[str, Any], timeout_s: float,
                  proc: subprocess.Popen | None = None) -> None:  # fmt: skip
    """Stop the process group a record (`pid`, `start_time`) names: SIGTERM, SIGKILL after
    `timeout_s`. A live leader with another start time is a reused pid, not ours: left alone
    (a dead leader cannot have had its pid reused while its group still has members)."""
    pgid = int(info["pid"])
    started = process_start_time(pgid)
    if started is not None and started != info.get("start_time", started):
        return
    for sig, wait_s in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if proc is not None:
                proc.poll()  # reap our own child
            else:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(-pgid, os.WNOHANG)  # reap it where it is our child
            if not group_alive(pgid):
                return
            time.sleep(0.05)


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


class LocalProvisioner:
    """Engine replicas as local processes (the embedded default: no cloud account needed)."""

    name = "local"

    def __init__(
        self,
        home: Path | None = None,
        python: str = sys.executable,
        host: str = "127.0.0.1",
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        stop_timeout_s: float = 10.0,
        tls: bool = False,
    ) -> None:
        self.home = Path(home) if home else default_home()
        self.python = python
        self.host = host
        self.cwd = cwd
        self.env = env or {}
        self.stop_timeout_s = stop_timeout_s
        self.tls = tls
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    def run_dir(self, name: str) -> Path:
        return self.home / "replicas" / name

    def check(self, clouds: set[str]) -> None:
        """Raise if replicas cannot start here: a cloud offering, or the engine's extra missing
        (checked in this interpreter when replicas run on it)."""
        if clouds - {"local"}:
            raise ProvisionError(
                f"infra 'local' runs replicas on this machine only, but the plan uses "
                f"{', '.join(sorted(clouds - {'local'}))}: use infra: skypilot"
            )
        if self.python != sys.executable or "PYTHONPATH" in self.env:
            return  # another interpreter or path: its launch reports what is missing
        missing = [m for m in ("engine", "torch", "safetensors") if not _importable(m)]
        if missing:
            raise MissingExtraError(
                f"the local infra runs the bundled engine, which needs {', '.join(missing)}: "
                "pip install 'skybroker[engine]'"
            )

    def launch(self, spec: ReplicaSpec) -> ReplicaHandle:
        if spec.cloud != "local":
            raise ProvisionError(
                f"the local provisioner runs replicas on this machine only; replica {spec.name} "
                f"is planned on cloud {spec.cloud!r} (use infra: skypilot)"
            )
        self.terminate(ReplicaHandle(provider=self.name, name=spec.name))  # stale leftovers
        port = spec.port or free_port(self.host)
        run_dir = self.run_dir(spec.name)
        run_dir.mkdir(parents=True, exist_ok=True)
        log_path = run_dir / _LOG
        cert = _write_tls(run_dir, spec.name) if self.tls else None
        tls = (str(run_dir / _CERT), str(run_dir / _KEY)) if cert else None
        cmd = engine_command(spec, self.host, port, python=self.python, tls=tls)
        env = {**os.environ, **self.env, **spec.envs, **spec.secrets}
        with open(log_path, "ab") as log:
            log.write(f"$ {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                proc = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=self.cwd,
                    start_new_session=True,
                )
            except OSError as e:
                raise ProvisionError(f"cannot start replica {spec.name}: {e}") from e
        self._procs[spec.name] = proc
        info: dict[str, Any] = {
            "pid": proc.pid,
            "start_time": process_start_time(proc.pid),
            "port": port,
            "log_path": str(log_path),
        }
        if cert is not None:
            info["tls_cert"] = cert
        (run_dir / _RECORD).write_text(json.dumps(info))
        return ReplicaHandle(
            provider=self.name, name=spec.name, url=_url(self.host, port, info), info=info
        )

    def _info(self, handle: ReplicaHandle) -> dict[str, Any] | None:
        if handle.info.get("pid"):
            return handle.info
        record = self.run_dir(handle.name) / _RECORD
        if record.exists():
            return json.loads(record.read_text())
        return None

    def _alive(self, info: dict[str, Any], name: str) -> bool:
        proc = self._procs.get(name)
        if proc is not None and proc.pid == info["pid"] and proc.poll() is not None:
            return False
        started = process_start_time(info["pid"])
        return started is not None and started == info.get("start_time", started)

    def status(self, handle: ReplicaHandle) -> ReplicaState:
        info = self._info(handle)
        if info is None or not self._alive(info, handle.name):
            if (self.run_dir(handle.name) / _PREEMPTED).exists():
                return ReplicaState.PREEMPTED
            return ReplicaState.DEAD
        return ReplicaState.RUNNING

    def preempt(self, handle: ReplicaHandle) -> None:
        """Take the replica away as a cloud reclaims a spot instance (a hook for tests and
        demos): it is marked preempted and its processes are killed; `status` then says
        PREEMPTED until it is terminated."""
        info = self._info(handle)
        if info is None:
            raise ProvisionError(f"replica {handle.name} has no local record (not launched?)")
        (self.run_dir(handle.name) / _PREEMPTED).write_text(str(time.time()))
        stop_recorded(info, 0.0, self._procs.get(handle.name))

    def statuses(self, handles: list[ReplicaHandle]) -> dict[str, ReplicaState]:
        return {h.name: self.status(h) for h in handles}

    def failure(self, handle: ReplicaHandle) -> str | None:
        """Why a replica's process ended: its exit status (where this provisioner started
        it) and the last lines of its log; None while it runs."""
        if self.status(handle) != ReplicaState.DEAD:
            return None
        code = self.exit_code(handle)
        parts = [f"replica {handle.name}'s engine process ended"]
        if code is not None:
            parts.append(f"exit code {code}" if code >= 0 else f"killed by signal {-code}")
        tail = [ln for ln in self.logs(handle, tail=8).splitlines() if ln.strip()]
        if tail:
            parts.append("log tail: " + " | ".join(tail)[-600:])
        return "; ".join(parts)

    def startup_deadline_s(self, spec: ReplicaSpec) -> float:
        """Start-up of a local engine: interpreter and torch import, then the weights read
        from this machine's disk (no install, no download)."""
        from skybroker.provision.sky_setup import weight_bytes

        size = weight_bytes(spec.model) or 0.0
        return float(max(LOCAL_MIN_DEADLINE_S, LOCAL_BASE_S + size / LOCAL_LOAD_BYTES_PER_S))

    def progress(self, handle: ReplicaHandle) -> str | None:
        """The engine log's size: it grows while the engine imports, loads and warms up."""
        path = self.run_dir(handle.name) / _LOG
        try:
            return str(path.stat().st_size)
        except FileNotFoundError:
            return None

    def exit_code(self, handle: ReplicaHandle) -> int | None:
        """The exit status of a replica this provisioner started and that has exited (negative:
        killed by that signal); None when unknown (still running, or started by another broker)."""
        proc = self._procs.get(handle.name)
        return None if proc is None else proc.poll()

    def terminate(self, handle: ReplicaHandle) -> None:
        info = self._info(handle)
        if info is not None:
            stop_recorded(info, self.stop_timeout_s, self._procs.pop(handle.name, None))
        for leftover in (_RECORD, _PREEMPTED):
            with contextlib.suppress(FileNotFoundError):
                (self.run_dir(handle.name) / leftover).unlink()

    def endpoint(self, handle: ReplicaHandle) -> str:
        info = self._info(handle)
        if info is None:
            raise ProvisionError(f"replica {handle.name} has no local record (not launched?)")
        return _url(self.host, info["port"], info)

    def logs(self, handle: ReplicaHandle, tail: int = 200) -> str:
        path = self.run_dir(handle.name) / _LOG
        if not path.exists():
            return ""
        lines = path.read_text(errors="replace").splitlines()
        return "\n".join(lines[-tail:])
