"""The local provisioner: process group, port, log, record; terminate kills the whole group.

These tests run a stand-in `engine.serve` (a tiny HTTP server that also spawns a child in
its process group) from a temp dir that shadows the real engine package on sys.path; the
end-to-end tests (tests/test_launch_e2e.py) run the real engine server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest

from skybroker.provision import (
    Provisioner,
    ProvisionError,
    ReplicaHandle,
    ReplicaSpec,
    ReplicaState,
    engine_command,
    get_provisioner,
)
from skybroker.provision.local import LocalProvisioner, free_port, process_start_time

pytestmark = pytest.mark.timeout(60)

FAKE_SERVE = textwrap.dedent(
    """
    import argparse, http.server, os, subprocess, sys
    p = argparse.ArgumentParser()
    p.add_argument("--model"); p.add_argument("--served-model-name"); p.add_argument("--host")
    p.add_argument("--port", type=int); p.add_argument("--max-model-len")
    a, _ = p.parse_known_args()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = (os.environ.get("SECRET_SEEN", "") + " " + a.model).encode()
            self.send_response(200); self.send_header("Content-Length", str(len(body)))
            self.end_headers(); self.wfile.write(body)
        def log_message(self, *args): pass
    print("fake engine serving", a.served_model_name, "on", a.port, flush=True)
    http.server.HTTPServer((a.host, a.port), H).serve_forever()
    """
)


@pytest.fixture
def fake_engine_dir(tmp_path: Path) -> Path:
    pkg = tmp_path / "fakeroot" / "engine"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "serve.py").write_text(FAKE_SERVE)
    return tmp_path / "fakeroot"


@pytest.fixture
def prov(tmp_path: Path, fake_engine_dir: Path):
    p = LocalProvisioner(
        home=tmp_path / "home",
        cwd=fake_engine_dir,
        env={"CHILD_PID_FILE": str(tmp_path / "child.pid"), "PYTHONPATH": str(fake_engine_dir)},
        stop_timeout_s=5,
    )
    yield p
    for name in list(p._procs):
        p.terminate(ReplicaHandle(provider="local", name=name))


def _spec(name: str = "demo-1", **kw) -> ReplicaSpec:
    kw.setdefault("model", "/models/tiny")
    return ReplicaSpec(name=name, deployment="demo", served_model_name="tiny", **kw)


def _wait_http(url: str, timeout: float = 20) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return httpx.get(url, timeout=1)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_engine_command_flags() -> None:
    spec = _spec(tensor_parallel_size=2, engine_args={"max_model_len": 512, "kv_cache_gib": 0.5})
    cmd = engine_command(spec, "0.0.0.0", 8000)
    assert cmd == [
        "python", "-m", "engine.serve", "--model", "/models/tiny", "--served-model-name", "tiny",
        "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "2",
        "--kv-cache-gib", "0.5", "--max-model-len", "512",
    ]  # fmt: skip


def test_get_provisioner_and_protocol(tmp_path) -> None:
    p = get_provisioner("local", home=tmp_path)
    assert isinstance(p, Provisioner) and p.name == "local"
    with pytest.raises(ValueError, match="allowed: 'local', 'skypilot'"):
        get_provisioner("k8s")


def test_launch_status_logs_terminate_kills_group(prov, tmp_path) -> None:
    spec = _spec(secrets={"SECRET_SEEN": "s3cret"})
    handle = prov.launch(spec)
    assert handle.url == prov.endpoint(handle) == f"http://127.0.0.1:{handle.info['port']}"
    assert "s3cret" not in json.dumps(handle.to_dict())  # handles are stored: no secrets
    resp = _wait_http(handle.url + "/health")
    assert resp.text == "s3cret /models/tiny"  # the secret reached the process env only
    assert prov.status(handle) == ReplicaState.RUNNING
    assert os.getpgid(handle.info["pid"]) == handle.info["pid"]  # own process group
    child = int((tmp_path / "child.pid").read_text())
    assert os.getpgid(child) == handle.info["pid"]
    assert "fake engine serving tiny" in prov.logs(handle)
    record = json.loads((prov.run_dir(spec.name) / "replica.json").read_text())
    assert record["pid"] == handle.info["pid"]

    prov.terminate(handle)
    assert prov.status(handle) == ReplicaState.DEAD
    assert process_start_time(handle.info["pid"]) is None
    deadline = time.monotonic() + 5
    while process_start_time(child) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert process_start_time(child) is None  # the grandchild died with the group
    prov.terminate(handle)  # twice is fine


def test_terminate_by_name_only_after_broker_restart(prov, tmp_path, fake_engine_dir) -> None:
    handle = prov.launch(_spec("demo-7"))
    _wait_http(handle.url + "/health")
    fresh = LocalProvisioner(home=prov.home, cwd=fake_engine_dir)  # a restarted broker
    by_name = ReplicaHandle(provider="local", name="demo-7")
    assert fresh.status(by_name) == ReplicaState.RUNNING
    assert fresh.endpoint(by_name) == handle.url
    fresh.terminate(by_name)
    deadline = time.monotonic() + 5
    while process_start_time(handle.info["pid"]) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prov.status(handle) == ReplicaState.DEAD


def test_sigkill_is_seen_as_dead(prov) -> None:
    handle = prov.launch(_spec())
    _wait_http(handle.url + "/health")
    os.kill(handle.info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while prov.status(handle) != ReplicaState.DEAD and time.monotonic() < deadline:
        time.sleep(0.05)
    assert prov.status(handle) == ReplicaState.DEAD
    prov.terminate(handle)  # kills the orphaned grandchild in the group


def test_statuses_failure_progress_and_deadline(prov, tmp_path) -> None:
    handle = prov.launch(_spec())
    other = ReplicaHandle(provider="local", name="never-launched")
    _wait_http(handle.url + "/health")
    assert prov.statuses([handle, other]) == {"demo-1": "RUNNING", "never-launched": "DEAD"}
    assert prov.failure(handle) is None  # still running
    size = prov.progress(handle)
    assert size is not None and int(size) > 0  # the log has the command and the banner
    (prov.run_dir("demo-1") / "engine.log").open("a").write("loading weights\n")
    assert prov.progress(handle) != size
    (prov.run_dir("demo-1") / "engine.log").open("a").write("Traceback: CUDA error\n")
    os.killpg(handle.info["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 5
    while prov.status(handle) != ReplicaState.DEAD and time.monotonic() < deadline:
        time.sleep(0.05)
    why = prov.failure(handle)
    assert why.startswith("replica demo-1's engine process ended; killed by signal 9")
    assert "Traceback: CUDA error" in why
    model = tmp_path / "m.gguf"
    model.write_bytes(b"\0" * 1000)
    assert prov.startup_deadline_s(_spec(model=str(model))) == 300.0
    big = prov.startup_deadline_s(_spec(model="meta-llama/Llama-3.1-70B-Instruct"))
    assert big == pytest.approx(120 + 141.1e9 / 100e6, rel=0.01)


def test_reused_pid_is_not_killed(prov) -> None:
    me = ReplicaHandle(
        provider="local", name="x", info={"pid": os.getpid(), "start_time": -1, "port": 1}
    )
    assert prov.status(me) == ReplicaState.DEAD  # start time differs: not our replica
    prov.terminate(me)  # must not signal this test process's group
    assert process_start_time(os.getpid()) is not None


def test_refuses_cloud_offering_and_unknown_replica(prov) -> None:
    with pytest.raises(ProvisionError, match="use infra: skypilot"):
        prov.launch(_spec(cloud="aws", region="us-east-1", instance_type="g5.xlarge"))
    ghost = ReplicaHandle(provider="local", name="ghost")
    assert prov.status(ghost) == ReplicaState.DEAD
    prov.terminate(ghost)
    with pytest.raises(ProvisionError, match="no local record"):
        prov.endpoint(ghost)
    assert prov.logs(ghost) == ""


def test_free_port_is_bindable() -> None:
    import socket

    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # raises if taken
        assert s.getsockname()[1] == port


def test_session_reaper_finds_and_kills_marked_processes(tmp_path: Path) -> None:
    """The conftest reaper: processes carrying a session marker in their environment (in
    their own process group, with a child) are found, killed, and reported."""
    from conftest import SESSION_MARKER, marked_processes, reap

    marker = f"reaper-test-{os.getpid()}-{time.time_ns()}"  # not this session's marker
    env = {**os.environ, SESSION_MARKER: marker, "CHILD_PID_FILE": str(tmp_path / "child.pid")}
    leader = subprocess.Popen(
        [sys.executable, "-c", CHILD_SPAWNER], env=env, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "child.pid").exists() or not (tmp_path / "child.pid").read_text():
            assert time.monotonic() < deadline, "the stand-in did not start its child"
            time.sleep(0.05)
        child = int((tmp_path / "child.pid").read_text())
        assert {p for p, _ in marked_processes(marker)} == {leader.pid, child}
        reaped = reap(marker)
        assert {p for p, _ in reaped} == {leader.pid, child}
        assert any("CHILD_PID_FILE" in cmd or "-c" in cmd for _, cmd in reaped)
        leader.wait(timeout=10)
        deadline = time.monotonic() + 10
        while process_start_time(child) is not None:
            assert time.monotonic() < deadline, "the child survived the reaper"
            time.sleep(0.05)
        assert marked_processes(marker) == []
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait()


CHILD_SPAWNER = textwrap.dedent(
    """
    import os, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(os.environ["CHILD_PID_FILE"], "w").write(str(child.pid))
    time.sleep(600)
    """
)
