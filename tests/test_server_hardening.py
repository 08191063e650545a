"""The engine server under hostile input and rough clients (issue 20's reproductions).

Most run against a real `python -m engine.serve` process (its key read from a file), its log
read back to check that nothing logged a traceback; the 500 that must keep its keep-alive
connection needs a fault injected, so it runs against an in-process uvicorn server.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.serve import build_app, main, parse_args
from tests.engine_process import free_port, start_engine, wait_healthy
from tests.raw_http import read_response
from tests.test_server import ENGINE_KW, MODEL, _serve

KEY = "hardening-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_BYTES = 4 * 2**20  # the server's default --max-request-bytes
TRACEBACKS = ("Traceback", "unhandled error", "Exception in ASGI application")


@dataclass
class Proc:
    url: str
    log: Path
    proc: subprocess.Popen[str]

    def post(self, path: str, body: object) -> httpx.Response:
        # json.dumps escapes to ASCII: a lone surrogate goes out as the escape "\ud800"
        return httpx.post(f"{self.url}{path}", content=json.dumps(body), timeout=120,
                          headers={**AUTH, "content-type": "application/json"})  # fmt: skip

    def log_text(self) -> str:
        return self.log.read_text()


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    tmp = tmp_path_factory.mktemp("hardening")
    (tmp / "key").write_text(KEY + "\n")
    port = free_port()
    log = tmp / "server.log"
    with log.open("w") as out:
        proc = start_engine(
            "--model", str(tiny_llama_dir), "--port", str(port), "--max-model-len", "256",
            "--kv-cache-gib", "0.05", "--served-model-name", MODEL,
            env={"SKYBROKER_API_KEY_FILE": str(tmp / "key")}, unset=("SKYBROKER_API_KEY",),
            stdout=out,
        )  # fmt: skip
    srv = Proc(f"http://127.0.0.1:{port}", log, proc)
    try:
        wait_healthy(proc, srv.url, log=log)
        yield srv
    finally:
        proc.terminate()
        proc.wait(60)


def _assert_400(r: httpx.Response, param: str, *words: str) -> dict[str, object]:
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param, err
    for w in words:
        assert w in err["message"], err
    return err


def test_key_comes_from_the_key_file(server: Proc) -> None:
    assert httpx.get(f"{server.url}/v1/models").status_code == 401
    assert httpx.get(f"{server.url}/v1/models", headers=AUTH).status_code == 200


def test_metrics_want_the_key_and_health_does_not(server: Proc) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(f"{server.url}/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert "engine:" not in r.text
    r = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert r.status_code == 200 and "engine:requests_total" in r.text
    assert httpx.get(f"{server.url}/health").status_code == 200


# ---- 1. lone surrogates ---------------------------------------------------------------------

SURROGATES = [
    ("/v1/completions", {"prompt": "\ud800", "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "a\udfff"], "max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "stop": ["\ud800"]}, "stop"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udbff!"}]}, "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("path", "body", "param"), SURROGATES)
def test_lone_surrogate_is_400(server: Proc, path: str, body: object, param: str) -> None:
    _assert_400(server.post(path, body), param, "lone UTF-16 surrogate")


@pytest.mark.slow
def test_surrogate_pair_is_text(server: Proc) -> None:
    r = server.post("/tokenize", {"prompt": "x\U0001f600"})  # sent as "\ud83d\ude00"
    assert r.status_code == 200 and r.json()["count"] >= 2


# ---- 2. non-finite logprobs -----------------------------------------------------------------


@pytest.mark.slow
def test_penalty_that_overflows_float32_is_400(server: Proc) -> None:
    body = {"prompt": "the cat", "max_tokens": 3, "logprobs": 0, "repetition_penalty": 5e-324}
    _assert_400(server.post("/v1/completions", body), "repetition_penalty", "0.000001")


@pytest.mark.slow
@pytest.mark.parametrize("stream", [False, True])
def test_banned_tokens_logprobs_are_finite(server: Proc, stream: bool) -> None:
    """min_tokens bans the stop tokens (logit -inf): JSON has no -inf, they read -9999."""
    vocab = 384
    banned = {"min_tokens": 2, "stop_token_ids": list(range(3, vocab)), "temperature": 0}
    r = server.post("/v1/completions", {"prompt": "the cat", "max_tokens": 2, "logprobs": 5,
                                        "stream": stream, **banned})  # fmt: skip
    assert r.status_code == 200, r.text
    if stream:
        chunks = [json.loads(e[6:]) for e in r.text.split("\n\n") if e.startswith("data: {")]
        tops = [t for c in chunks for t in c["choices"][0]["logprobs"]["top_logprobs"]]
    else:
        tops = r.json()["choices"][0]["logprobs"]["top_logprobs"]
    assert len(tops) == 2 and all(len(t) == 5 for t in tops)
    assert -9999.0 in tops[0].values()
    r = server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "logprobs": True,
        "top_logprobs": 5, **banned})  # fmt: skip
    assert r.status_code == 200, r.text
    top = r.json()["choices"][0]["logprobs"]["content"][0]["top_logprobs"]
    assert [t["logprob"] for t in top][-1] == -9999.0


# ---- 3. /tokenize with no messages ----------------------------------------------------------


@pytest.mark.slow
def test_tokenize_empty_messages_is_400(server: Proc) -> None:
    _assert_400(server.post("/tokenize", {"messages": []}), "messages", "at least 1")


# ---- 4. body limit; long prompts tokenize off the event loop --------------------------------


@pytest.mark.slow
def test_body_over_the_limit_is_413_and_keeps_the_connection(server: Proc) -> None:
    big = b'{"prompt": "' + b"a" * MAX_BYTES + b'"}'

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        for i in range(0, len(big), 2**16):
            yield big[i : i + 2**16]

    with httpx.Client(headers={**AUTH, "content-type": "application/json"}, timeout=60) as c:
        for content in (big, chunked()):
            r = c.post(f"{server.url}/v1/completions", content=content)
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["code"] == "request_too_large" and str(MAX_BYTES) in err["message"]
            ok = c.post(f"{server.url}/tokenize", json={"prompt": "the cat"})
            assert ok.status_code == 200


@pytest.mark.slow
def test_health_answers_while_a_long_prompt_tokenizes(server: Proc) -> None:
    """About 4 MB of prompt takes seconds to tokenize: the event loop must not wait for it."""
    prompt = "the cat sat " * ((MAX_BYTES - 100) // 12)
    done = threading.Event()
    result: list[httpx.Response] = []

    def send() -> None:
        result.append(server.post("/v1/completions", {"prompt": prompt, "max_tokens": 1}))
        done.set()

    sender = threading.Thread(target=send)
    sender.start()
    gaps: list[float] = []
    with httpx.Client(timeout=30) as c:
        while not done.is_set():
            t0 = time.monotonic()
            assert c.get(f"{server.url}/health").status_code == 200
            gaps.append(time.monotonic() - t0)
            time.sleep(0.05)
    sender.join()
    _assert_400(result[0], "prompt", "maximum context length")
    assert len(gaps) >= 5, gaps  # the prompt was really in flight for a while
    assert max(gaps) < 1.0, gaps


# ---- 5. dropped clients ---------------------------------------------------------------------


@pytest.mark.slow
def test_dropped_clients_log_no_traceback(server: Proc) -> None:
    body = {"prompt": "the cat sat on", "max_tokens": 240, "ignore_eos": True, "temperature": 0}
    before = _metric(server, "engine:requests_total", 'outcome="abort"')

    async def go() -> list[asyncio.Task[httpx.Response]]:
        async with httpx.AsyncClient(headers=AUTH, timeout=60) as c:
            url = f"{server.url}/v1/completions"
            tasks = [asyncio.create_task(c.post(url, json=body)) for _ in range(20)]
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and _in_engine(server) < 20:
                await asyncio.sleep(0.01)
            for t in tasks:
                t.cancel()  # closes its connection mid-request
            await asyncio.wait(tasks)
            return tasks

    tasks = asyncio.run(go())
    dropped = sum(t.cancelled() for t in tasks)
    assert dropped >= 10, "the requests finished before the clients left"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _aborted(server) < before + dropped:
        time.sleep(0.1)
    assert _aborted(server) == before + dropped
    log = server.log_text()
    assert not any(t in log for t in TRACEBACKS), log[-3000:]


def _in_engine(server: Proc) -> float:
    return sum(
        _metric(server, f"engine:num_requests_{s}", "") for s in ("running", "waiting", "pending")
    )


def _metric(server: Proc, name: str, label: str) -> float:
    r = httpx.get(f"{server.url}/metrics", headers=AUTH)
    assert r.status_code == 200, r.text
    for line in r.text.splitlines():
        if line.startswith(name + "{") and label in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _aborted(server: Proc) -> float:
    return _metric(server, "engine:requests_total", 'outcome="abort"')


# ---- 8. top_p too small for float32 ---------------------------------------------------------


@pytest.mark.slow
def test_tiny_top_p_samples_the_top_token(server: Proc) -> None:
    base = {"prompt": "the cat sat on the", "max_tokens": 8, "ignore_eos": True}
    greedy = server.post("/v1/completions", {**base, "temperature": 0}).json()
    for seed in range(3):
        r = server.post("/v1/completions", {**base, "top_p": 5e-324, "seed": seed}).json()
        assert r["choices"][0]["text"] == greedy["choices"][0]["text"]


@pytest.mark.slow
def test_no_traceback_in_the_log(server: Proc) -> None:
    """Everything above (run first) answered without logging a traceback."""
    log = server.log_text()
    assert not any(t in log for t in TRACEBACKS), log[-3000:]


# ---- 6. a 500 keeps its keep-alive connection -----------------------------------------------


def _request(body: dict[str, object]) -> bytes:
    data = json.dumps(body).encode()
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


@pytest.mark.slow
def test_500_keeps_the_keep_alive_connection(
    tiny_llama_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW))
    real_encode = engine.tokenizer.encode

    def encode(text: str, *args: object, **kw: object) -> list[int]:
        if text == "boom":
            raise RuntimeError("injected fault")
        return real_encode(text, *args, **kw)

    engine.tokenizer.encode = encode  # type: ignore[method-assign]
    with _serve(engine) as srv, socket.create_connection(srv.sock.getsockname()[:2]) as sock:
        for _ in range(3):
            sock.sendall(_request({"prompt": "boom", "max_tokens": 2}))
            status, body = read_response(sock)
            assert status == 500, body
            err = json.loads(body)["error"]
            assert err == {"message": "internal error: RuntimeError", "type": "server_error",
                           "param": None, "code": None}  # fmt: skip
            sock.sendall(_request({"prompt": "the cat", "max_tokens": 2}))
            status, body = read_response(sock)
            assert status == 200, body
    errors = [r for r in caplog.records if r.getMessage().startswith("unhandled error")]
    assert len(errors) == 3  # logged once each, with the traceback
    assert all(r.exc_info and r.exc_info[0] is RuntimeError for r in errors)


# ---- 7. no open endpoint off loopback; the key from the environment or a file --------------


def test_off_loopback_needs_a_key(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.delenv("SKYBROKER_API_KEY", raising=False)
    monkeypatch.delenv("SKYBROKER_API_KEY_FILE", raising=False)
    model = str(tiny_llama_dir)  # never loaded: build_app only validates the flags
    for host in ("0.0.0.0", "::", "10.1.2.3", "my-host.example"):
        assert main(["--model", model, "--host", host, "--port", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--host {host}" in err and "API key" in err and "--allow-unauthenticated" in err
    for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost"):
        assert build_app(parse_args(["--model", model, "--host", host])).state.server
    opened = build_app(parse_args(["--model", model, "--host", "0.0.0.0",
                                   "--allow-unauthenticated"]))  # fmt: skip
    assert opened.state.server.config.api_key is None
    keyed = build_app(parse_args(["--model", model, "--host", "0.0.0.0", "--api-key", "k"]))
    assert keyed.state.server.config.api_key == "k"


def test_api_key_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.serve import read_api_key

    monkeypatch.delenv("SKYBROKER_API_KEY", raising=False)
    monkeypatch.delenv("SKYBROKER_API_KEY_FILE", raising=False)
    (tmp_path / "k1").write_text("from-flag-file\n")
    (tmp_path / "k2").write_text("  from-env-file  \n")
    (tmp_path / "empty").write_text("\n")

    def key(*argv: str) -> str | None:
        return read_api_key(parse_args(["--model", "m", *argv]))

    assert key() is None
    monkeypatch.setenv("SKYBROKER_API_KEY_FILE", str(tmp_path / "k2"))
    assert key() == "from-env-file"
    monkeypatch.setenv("SKYBROKER_API_KEY", "from-env")
    assert key() == "from-env"
    assert key("--api-key", "from-flag") == "from-flag"
    assert key("--api-key", "x", "--api-key-file", str(tmp_path / "k1")) == "from-flag-file"
    with pytest.raises(ValueError, match="is empty"):
        key("--api-key-file", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match=r"cannot read the API key file .*missing"):
        key("--api-key-file", str(tmp_path / "missing"))
