"""A 500 from the broker's REST API keeps the client's keep-alive connection (real uvicorn)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn

from skybroker.api import create_app
from skybroker.controller import Controller
from skybroker.state import Store
from tests.raw_http import read_response


class _Faulty(Controller):
    """A real controller that fails to read the deployment named `boom`: the fault a 500
    answers."""

    def get(self, name: str):  # type: ignore[override]
        if name == "boom":
            raise RuntimeError("injected fault")
        return super().get(name)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, int]]:
    monkeypatch.setenv("SKYBROKER_HOME", str(tmp_path / "home"))
    store = Store(f"sqlite:///{tmp_path / 'state.db'}")
    controller = _Faulty(store)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(create_app(controller), log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    host, port = sock.getsockname()[:2]
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"http://{host}:{port}/health", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the broker API did not start"
        time.sleep(0.1)
    yield host, port
    srv.should_exit = True
    thread.join(30)
    controller.close()
    store.close()


def _get(sock: socket.socket, path: str) -> tuple[int, bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return read_response(sock)


def test_500_keeps_the_keep_alive_connection(
    server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    with socket.create_connection(server) as sock:
        for _ in range(3):
            status, body = _get(sock, "/v1/deployments/boom")
            assert status == 500, body
            err = json.loads(body)["error"]
            assert err["code"] == "internal"
            assert err["message"] == "internal error: RuntimeError"
            status, body = _get(sock, "/health")  # the same connection still serves
            assert status == 200, body
    logged = [r for r in caplog.records if r.getMessage().startswith("unhandled error")]
    assert len(logged) == 3 and all(r.exc_info for r in logged)
