"""The broker server process: uvicorn hosting the REST API plus the controller's reconcile loop.

`skybroker server start` spawns `python -m skybroker.server` in the background (its own
session, output to `$SKYBROKER_HOME/server.log`), waits for `/health`, and the child records
itself in `$SKYBROKER_HOME/server.json` (pid, host, port; never the token). `stop` sends
SIGTERM (SIGKILL after a grace period); a pid file whose process is gone is stale and removed.

It binds 127.0.0.1 by default. Binding any other address needs an API token, read from the
env variable SKYBROKER_API_TOKEN or from a file (SKYBROKER_API_TOKEN_FILE or --token-file).
Deployments' routers bind --router-host (127.0.0.1 by default): each is a process of its own
that keeps serving while this server is stopped or restarted, and each wants its deployment's
own key (`skybroker status NAME --show-key`); a router refuses to listen off loopback
without one.

Specs sent over the API may name files only under the `--allow-path` directories
($SKYBROKER_ALLOWED_PATHS). The server writes a random owner key to `$SKYBROKER_HOME/owner.key`
(mode 0600): the local CLI of the user who started it sends that key, and its specs name any
file on that user's disk, as `skybroker plan` does.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 46590
PORT_ENV = "SKYBROKER_API_PORT"
TOKEN_ENV = "SKYBROKER_API_TOKEN"
TOKEN_FILE_ENV = "SKYBROKER_API_TOKEN_FILE"
URL_ENV = "SKYBROKER_API_URL"
STATE_URL_ENV = "SKYBROKER_STATE_URL"
PID_FILE = "server.json"
LOG_FILE = "server.log"
LOCK_FILE = "server.lock"
OWNER_KEY_FILE = "owner.key"


class ServerError(RuntimeError):
    """The broker server could not be started, stopped or reached (message for a person)."""


@dataclass
class ServerInfo:
    """What the pid file records about a running broker server."""

    pid: int
    host: str
    port: int
    started_at: float

    @property
    def url(self) -> str:
        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # a wildcard bind is reachable on loopback
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"


@dataclass
class ServerStatus:
    """The answer of `status()`: running, healthy, and whether a stale pid file was cleaned."""

    running: bool
    healthy: bool
    info: ServerInfo | None
    stale_removed: bool = False


def home() -> Path:
    """$SKYBROKER_HOME, default ~/.skybroker (created on demand, private to the user)."""
    path = Path(os.environ.get("SKYBROKER_HOME") or "~/.skybroker").expanduser()
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def default_port() -> int:
    """The local broker server's port: $SKYBROKER_API_PORT, else 46590."""
    raw = os.environ.get(PORT_ENV) or str(DEFAULT_PORT)
    try:
        return int(raw)
    except ValueError:
        raise ServerError(f"{PORT_ENV}={raw!r} is not a port number") from None


def pid_path() -> Path:
    return home() / PID_FILE


def log_path() -> Path:
    return home() / LOG_FILE


def owner_key_path() -> Path:
    return home() / OWNER_KEY_FILE


def read_owner_key() -> str | None:
    """The running local server's owner key, if this user can read it."""
    try:
        return owner_key_path().read_text().strip() or None
    except OSError:
        return None


def _write_owner_key() -> str:
    import secrets

    key = secrets.token_urlsafe(32)
    path = owner_key_path()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key)
    tmp.replace(path)
    return key


def read_token(token_file: str | Path | None = None) -> str | None:
    """The API token: --token-file, else $SKYBROKER_API_TOKEN, else $SKYBROKER_API_TOKEN_FILE."""
    if token_file is None and os.environ.get(TOKEN_ENV):
        return os.environ[TOKEN_ENV].strip() or None
    token_file = token_file or os.environ.get(TOKEN_FILE_ENV)
    if not token_file:
        return None
    path = Path(token_file).expanduser()
    try:
        token = path.read_text().strip()
    except OSError as e:
        raise ServerError(f"cannot read the API token file {path}: {e.strerror}") from None
    if not token:
        raise ServerError(f"the API token file {path} is empty")
    return token


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the broker beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise ServerError(
            f"binding {host} exposes the broker to the network and needs an API token: "
            f"set {TOKEN_ENV} or pass --token-file (or bind 127.0.0.1)"
        )


# ---------------------------------------------------------------- pid file


def read_pid_file() -> ServerInfo | None:
    try:
        data = json.loads(pid_path().read_text())
        return ServerInfo(
            pid=int(data["pid"]),
            host=str(data["host"]),
            port=int(data["port"]),
            started_at=float(data["started_at"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        return ServerInfo(pid=-1, host=DEFAULT_HOST, port=DEFAULT_PORT, started_at=0.0)


def _write_pid_file(info: ServerInfo) -> None:
    path = pid_path()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(info)))
    tmp.replace(path)


def _remove_pid_file(pid: int | None = None) -> None:
    """Remove the pid file; with `pid`, only if it still names that process."""
    info = read_pid_file()
    if info is None or (pid is not None and info.pid != pid):
        return
    with contextlib.suppress(FileNotFoundError):
        pid_path().unlink()


def pid_alive(pid: int) -> bool:
    """True if `pid` runs and (where /proc exists) is a skybroker server, not a reused pid."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            return False
        if b"skybroker.server" not in args:
            return False
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    return True


@contextlib.contextmanager
def _start_lock() -> Iterator[None]:
    """Serialize concurrent `start`s (two CLI calls auto-starting at once)."""
    with open(home() / LOCK_FILE, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------- health


def health(url: str, timeout: float = 2.0) -> dict | None:
    """The server's /health answer (it names its pid), or None when it does not answer 200."""
    import httpx

    try:
        r = httpx.get(f"{url}/health", timeout=timeout)
        return r.json() if r.status_code == 200 else None
    except (httpx.HTTPError, ValueError):
        return None


def healthy(info: ServerInfo, timeout: float = 2.0) -> bool:
    """True when the server at info.url answers /health and is the process the pid file names."""
    answer = health(info.url, timeout)
    return answer is not None and answer.get("pid") == info.pid


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def wait_healthy(proc: subprocess.Popen[bytes], timeout: float) -> ServerInfo:
    """Wait for the child to write its pid file and answer /health; fail with its log tail."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(
                f"the broker server exited with code {proc.returncode} while starting; "
                f"last lines of {log_path()}:\n{_tail(log_path())}"
            )
        info = read_pid_file()
        if info is not None and info.pid == proc.pid and healthy(info, timeout=1.0):
            return info
        time.sleep(0.1)
    raise ServerError(
        f"the broker server did not become healthy within {timeout:.0f}s; "
        f"see {log_path()}:\n{_tail(log_path())}"
    )


# ---------------------------------------------------------------- start / stop / status


def status() -> ServerStatus:
    """Whether a broker server runs here; removes a stale pid file."""
    info = read_pid_file()
    if info is None:
        return ServerStatus(running=False, healthy=False, info=None)
    if not pid_alive(info.pid):
        _remove_pid_file(info.pid if info.pid > 0 else None)
        return ServerStatus(running=False, healthy=False, info=None, stale_removed=True)
    return ServerStatus(running=True, healthy=healthy(info), info=info)


def start(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    token_file: str | Path | None = None,
    state_url: str | None = None,
    router_host: str = DEFAULT_HOST,
    allow_paths: list[str | Path] | None = None,
    timeout: float = 60.0,
) -> tuple[ServerInfo, bool]:
    """Start the broker server in the background unless one runs; returns (info, started)."""
    token = read_token(token_file)
    check_bind(host, token)
    with _start_lock():
        st = status()
        if st.running and st.info is not None:
            return st.info, False
        cmd = [sys.executable, "-m", "skybroker.server", "--host", host, "--port", str(port)]
        if token_file:
            cmd += ["--token-file", str(Path(token_file).expanduser().resolve())]
        if state_url:
            cmd += ["--state-url", state_url]
        if router_host != DEFAULT_HOST:
            cmd += ["--router-host", router_host]
        for d in allow_paths or []:
            cmd += ["--allow-path", str(Path(d).expanduser().resolve())]
        with open(log_path(), "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # survives the CLI's terminal closing
                close_fds=True,
            )
        try:
            return wait_healthy(proc, timeout), True
        except ServerError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            _remove_pid_file(proc.pid)
            raise


def ensure_running(timeout: float = 60.0) -> ServerInfo:
    """The local broker server, started with the defaults if none runs (the CLI's auto-start)."""
    st = status()
    if st.running and st.info is not None:
        return st.info
    info, _ = start(
        port=default_port(),
        token_file=os.environ.get(TOKEN_FILE_ENV),
        state_url=os.environ.get(STATE_URL_ENV),
        timeout=timeout,
    )
    return info


def stop(timeout: float = 15.0) -> ServerStatus:
    """Stop the broker server (SIGTERM, then SIGKILL after `timeout`). Idempotent."""
    st = status()
    if not st.running or st.info is None:
        return st
    pid = st.info.pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        while pid_alive(pid):
            time.sleep(0.05)
    _remove_pid_file(pid)
    return ServerStatus(running=False, healthy=False, info=st.info)


# ---------------------------------------------------------------- the server process itself


def build_controller(state_url: str | None, router_host: str = DEFAULT_HOST):  # -> Controller
    """The controller over the state store; provisioners (local, skypilot) load on first use.
    It re-adopts the deployments a previous broker server left running."""
    from skybroker.controller import Controller
    from skybroker.state import Store

    return Controller(Store(state_url), router_host=router_host)


def serve(
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    token: str | None = None,
    state_url: str | None = None,
    router_host: str = DEFAULT_HOST,
    allow_paths: list[Path] | None = None,
) -> None:
    """Run the broker server in this process until SIGTERM/SIGINT."""
    import uvicorn

    from skybroker.api import create_app
    from skybroker.validate import allowed_paths_from_env

    check_bind(host, token)
    controller = build_controller(state_url, router_host)
    allowed = [*(allow_paths or []), *allowed_paths_from_env()]
    app = create_app(controller, token=token, allowed_paths=allowed, owner_key=_write_owner_key())
    stop_event = threading.Event()
    loop = threading.Thread(
        target=controller.run, args=(stop_event,), name="reconcile", daemon=True
    )
    config = uvicorn.Config(app, host=host, port=port, log_level="info", access_log=True)
    server = uvicorn.Server(config)
    info = ServerInfo(pid=os.getpid(), host=host, port=port, started_at=time.time())
    loop.start()
    _write_pid_file(info)
    try:
        server.run()
    finally:
        stop_event.set()
        loop.join(timeout=30)
        controller.close()  # routers stop; replicas keep running for the next server
        _remove_pid_file(info.pid)
    if not server.started:
        raise SystemExit(1)


def main(argv: list[str] | None = None) -> None:
    """`python -m skybroker.server`: run the broker server in the foreground."""
    parser = argparse.ArgumentParser(prog="python -m skybroker.server", description=__doc__)
    parser.add_argument("--host", default=DEFAULT_HOST)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--token-file", default=None, help="file holding the API token")
    parser.add_argument("--state-url", default=os.environ.get(STATE_URL_ENV))
    parser.add_argument(
        "--router-host", default=DEFAULT_HOST, help="address deployments' routers bind"
    )
    parser.add_argument(
        "--allow-path",
        action="append",
        default=[],
        type=Path,
        help="directory whose files specs sent over the API may name (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        token = read_token(args.token_file)
        serve(
            args.host,
            args.port,
            token=token,
            state_url=args.state_url,
            router_host=args.router_host,
            allow_paths=args.allow_path,
        )
    except ServerError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
