"""`python -m engine.serve` as a real process for tests: start it, wait for its /health."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_engine(
    *args: str,
    env: dict[str, str] | None = None,
    unset: tuple[str, ...] = (),
    stdout: int | IO[str] = subprocess.PIPE,
) -> subprocess.Popen[str]:
    """`python -m engine.serve ARGS` from the repository root with one torch thread, `env`
    added to this process's environment and the names in `unset` taken out of it; stderr goes
    with stdout."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in unset:
        full.pop(name, None)
    return subprocess.Popen(
        [sys.executable, "-m", "engine.serve", *args],
        cwd=ROOT, env=full, stdout=stdout, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


def wait_healthy(
    proc: subprocess.Popen[str],
    url: str,
    timeout_s: float = 300,
    verify: bool | ssl.SSLContext = True,
    log: Path | None = None,
) -> None:
    """Return once `url`/health answers 200; fail with the engine's output (its `log` file, or
    its piped stdout) if it exits first or `timeout_s` passes."""

    def output() -> str:
        if log is not None:
            return log.read_text()
        if proc.poll() is not None and proc.stdout is not None:
            return proc.stdout.read()
        return f"no answer from {url}/health in {timeout_s} s"

    deadline = time.monotonic() + timeout_s
    while True:
        assert proc.poll() is None, output()
        assert time.monotonic() < deadline, output()
        try:
            if httpx.get(f"{url}/health", verify=verify, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
