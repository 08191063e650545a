"""Real brokers for tests: a Controller on a fresh SQLite store, its reconcile loop, and the
API app served by uvicorn in a thread (as `python -m skybroker.server` runs them)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from skybroker.controller import Controller, ProbeConfig
from skybroker.state import Store


@contextlib.contextmanager
def controller_at(
    tmp: Path, env: dict[str, str] | None = None, **kwargs: Any
) -> Iterator[Controller]:
    """A Controller on `tmp`/state.db with SKYBROKER_HOME=`tmp`/home (and `env`) for the block;
    `kwargs` go to Controller."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKYBROKER_HOME", str(tmp / "home"))
        for name, value in (env or {}).items():
            mp.setenv(name, value)
        store = Store(f"sqlite:///{tmp / 'state.db'}")
        controller = Controller(store, **kwargs)
        try:
            yield controller
        finally:
            controller.close()
            store.close()


@contextlib.contextmanager
def reconciling_controller_at(tmp: Path, interval_s: float) -> Iterator[Controller]:
    """controller_at(`tmp`) with a 2 s probe and its reconcile loop every `interval_s`; at the
    end the loop stops and every deployment left is deleted (a failed test must not leave
    engines running)."""
    with controller_at(tmp, probe=ProbeConfig(timeout_s=2)) as controller:
        stop = threading.Event()
        loop = threading.Thread(target=controller.run, args=(stop, interval_s), daemon=True)
        loop.start()
        try:
            yield controller
        finally:
            stop.set()
            loop.join(timeout=30)
            for dep in controller.list():
                controller.delete(dep.name)


@contextlib.contextmanager
def served(app: Any) -> Iterator[str]:
    """The URL of `app` served by uvicorn in a thread on a free port, for the block."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    try:
        while not srv.started:
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
