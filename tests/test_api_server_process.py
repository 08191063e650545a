"""The broker server's process management: tokens, bind policy, pid file, stale pids."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from skybroker import server
from skybroker.provision.local import free_port


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path))
    monkeypatch.delenv(server.TOKEN_ENV, raising=False)
    monkeypatch.delenv(server.TOKEN_FILE_ENV, raising=False)
    return tmp_path


def test_token_from_env_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert server.read_token() is None
    monkeypatch.setenv(server.TOKEN_ENV, " s3cret \n")
    assert server.read_token() == "s3cret"
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    assert server.read_token(f) == "from-file"  # an explicit file wins over the env
    monkeypatch.delenv(server.TOKEN_ENV)
    monkeypatch.setenv(server.TOKEN_FILE_ENV, str(f))
    assert server.read_token() == "from-file"


def test_token_file_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(server.ServerError, match="cannot read the API token file"):
        server.read_token(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(server.ServerError, match="is empty"):
        server.read_token(tmp_path / "empty")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.5", "::1", "localhost"])
def test_loopback_binds_need_no_token(host: str) -> None:
    assert server.is_loopback(host)
    server.check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "example.com"])
def test_other_binds_need_a_token(host: str) -> None:
    assert not server.is_loopback(host)
    with pytest.raises(server.ServerError, match="needs an API token"):
        server.check_bind(host, None)
    server.check_bind(host, "tok")


def test_start_refuses_public_bind_without_token(_home: Path) -> None:
    with pytest.raises(server.ServerError, match="SKYBROKER_API_TOKEN"):
        server.start("0.0.0.0", 1)
    assert not server.pid_path().exists()


def test_url_of_wildcard_bind_is_loopback() -> None:
    assert server.ServerInfo(1, "0.0.0.0", 9, 0.0).url == "http://127.0.0.1:9"
    assert server.ServerInfo(1, "::1", 9, 0.0).url == "http://[::1]:9"


def _write_pid(pid: int) -> None:
    server.pid_path().write_text(
        json.dumps({"pid": pid, "host": "127.0.0.1", "port": 1, "started_at": 0})
    )


def test_stale_pid_of_dead_process_is_removed() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    _write_pid(proc.pid)
    st = server.status()
    assert (st.running, st.stale_removed) == (False, True)
    assert not server.pid_path().exists()


def test_reused_pid_of_another_program_is_not_the_server() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        _write_pid(proc.pid)  # alive, but not `python -m skybroker.server`
        assert not server.pid_alive(proc.pid)
        st = server.status()
        assert not st.running and st.stale_removed
        st = server.stop()  # must not signal that process
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_corrupt_pid_file_is_stale() -> None:
    server.pid_path().write_text("{not json")
    st = server.status()
    assert not st.running and st.stale_removed
    assert not server.pid_path().exists()


def test_stop_and_status_without_server() -> None:
    st = server.stop()
    assert not st.running and st.info is None and not st.stale_removed
    assert server.status().running is False


def test_start_reports_child_failure_with_log_tail(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that cannot start (here: a bad --state-url) fails start() with its log tail."""
    t0 = time.monotonic()
    with pytest.raises(server.ServerError, match="exited with code") as exc:
        server.start(port=1, state_url="nosuchdialect://x", timeout=60)
    assert time.monotonic() - t0 < 60
    assert "nosuchdialect" in str(exc.value) or "Error" in str(exc.value)
    assert not server.pid_path().exists()


def _skybroker(*args: str) -> Any:
    from typer.testing import CliRunner

    from skybroker.cli import app

    result = CliRunner().invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_cli_autostarts_server_then_start_status_stop(
    _home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real server process: auto-started by the CLI, token enforced, stopped cleanly."""
    import httpx

    token = "process-test-token-42"
    port = free_port()
    monkeypatch.setenv(server.PORT_ENV, str(port))
    monkeypatch.setenv(server.TOKEN_ENV, token)
    monkeypatch.delenv(server.URL_ENV, raising=False)
    info = None
    try:
        r = _skybroker("status")  # no server yet: the CLI starts one
        assert r.exit_code == 0, r.output
        assert "no deployments" in r.output
        flat = " ".join(r.output.split())
        assert "started the local broker server at" in flat and "skybroker server stop" in flat
        assert "started the local broker server" not in _skybroker("status").output  # once
        info = server.read_pid_file()
        owner = server.owner_key_path()  # the key that lets this user's CLI name any file
        assert owner.stat().st_mode & 0o077 == 0 and len(owner.read_text()) >= 32
        assert info is not None and info.port == port and server.pid_alive(info.pid)
        assert token not in server.pid_path().read_text()

        url = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{url}/v1/deployments").status_code == 401
        authed = httpx.get(f"{url}/v1/deployments", headers={"Authorization": f"Bearer {token}"})
        assert authed.json() == {"deployments": []}

        trace = _home / "trace.jsonl"  # a file on this user's disk, outside any allowed dir
        trace.write_text('{"input_tokens": 50, "output_tokens": 10}\n' * 3)
        spec = {"name": "t", "infra": "skypilot", "model": "meta-llama/Llama-3.1-8B-Instruct",
                "workload": {"rate": 1, "trace": str(trace)}, "slo": {"tpot_ms": 1e-3}}  # fmt: skip
        from skybroker.client import ApiError, BrokerClient

        with pytest.raises(ApiError) as err, BrokerClient() as own:  # sends the owner key
            own.plan(json.dumps(spec))
        assert err.value.code == "infeasible"  # the trace was read: the file is allowed
        other = httpx.post(
            f"{url}/v1/plans", json=spec, headers={"Authorization": f"Bearer {token}"}
        )
        assert other.status_code == 422 and other.json()["error"]["field"] == "workload.trace"
        assert "outside the directories" in other.json()["error"]["message"]

        r = _skybroker("server", "start")
        assert r.exit_code == 0 and "already running" in r.output
        assert f"dashboard: {url}/dashboard" in r.output
        r = _skybroker("dashboard")  # not a terminal: prints the URL, opens no browser
        assert r.exit_code == 0 and r.output.strip() == f"dashboard: {url}/dashboard"
        page = httpx.get(f"{url}/dashboard")  # open: the page holds no secret, its data does
        assert page.status_code == 200 and token not in page.text
        r = _skybroker("server", "status")
        assert r.exit_code == 0 and "healthy" in r.output and str(info.pid) in r.output
    finally:
        r = _skybroker("server", "stop")
    assert info is not None
    assert r.exit_code == 0 and f"stopped (pid {info.pid})" in r.output
    assert not server.pid_alive(info.pid) and not server.pid_path().exists()
    log = server.log_path().read_text()
    assert "Uvicorn running" in log and token not in log
    r = _skybroker("server", "status")
    assert r.exit_code == 1 and "not running" in r.output
