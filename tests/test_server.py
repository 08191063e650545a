"""Engine server end to end: the `openai` package as client against a real uvicorn server.

Outputs are compared with the offline engine (`LLM.generate` / `LLM.chat`) on the same tiny
model; httpx checks errors, auth, overload and client disconnects.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from engine import LLM, SamplingParams
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.server.app import ServerConfig, create_app

ENGINE_KW = dict(max_model_len=256, num_kv_blocks=160, block_size=16, max_num_seqs=16)
MODEL = "tiny"
PROMPT = "the cat sat on the river and the dog"


class ServerThread:
    """A real uvicorn server for an app, on a free loopback port, in a background thread."""

    def __init__(self, app: object, wait_ready: bool = True) -> None:
        self.wait_ready = wait_ready
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"{self.url}/health", timeout=5).status_code
                if status == 200 or not self.wait_ready:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become healthy")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def _serve(engine: LLMEngine, **config: object) -> ServerThread:
    return ServerThread(create_app(ServerConfig(served_model_name=MODEL, **config), lambda: engine))


@pytest.fixture(scope="module")
def model_dir(tiny_llama_dir: Path) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="module")
def server(model_dir: str) -> Iterator[ServerThread]:
    engine = LLMEngine.from_args(EngineArgs(model=model_dir, **ENGINE_KW))
    with _serve(engine) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(model_dir: str) -> LLM:
    return LLM(model_dir, **ENGINE_KW)


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def _engine_of(server: ServerThread) -> LLMEngine:
    return server.server.config.app.state.server.engine.engine


def _metric(server: ServerThread, name: str) -> float:
    key = server.server.config.app.state.server.config.api_key  # /metrics wants it, if any
    r = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    for line in r.text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"metric {name} not found")


# ---- same results as the offline engine -----------------------------------------------------


def test_completion_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    assert r.object == "text_completion" and r.model == MODEL
    assert r.choices[0].text == ref.outputs[0].text
    assert r.choices[0].finish_reason == ref.outputs[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12


def test_chat_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    messages = [
        {"role": "system", "content": "you answer"},
        {"role": "user", "content": "what is the capital of france"},
    ]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)


def test_stream_completion_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    chunks = list(
        client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    ref = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12))[0]
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    assert len([c for c in chunks if c.choices]) > 1  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_chat_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "user", "content": "hello world"}]
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )
    ref = offline.chat(messages, SamplingParams(temperature=0, max_tokens=10))[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_n_and_seed_match_offline(client: openai.OpenAI, offline: LLM) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, top_p=0.9, n=3)
    a = client.completions.create(seed=1234, **kw)
    b = client.completions.create(seed=1234, **kw)
    ref = offline.generate(
        PROMPT, SamplingParams(n=3, temperature=1.0, top_p=0.9, max_tokens=8, seed=1234)
    )[0]
    texts = [c.text for c in sorted(a.choices, key=lambda c: c.index)]
    assert [c.index for c in sorted(a.choices, key=lambda c: c.index)] == [0, 1, 2]
    assert texts == [c.text for c in sorted(b.choices, key=lambda c: c.index)]
    assert texts == [o.text for o in ref.outputs]
    assert a.usage.completion_tokens == 24


def test_stream_n_choices(client: openai.OpenAI, offline: LLM) -> None:
    stream = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, n=2, seed=7, stream=True
    )
    texts = {0: "", 1: ""}
    for c in stream:
        for ch in c.choices:
            texts[ch.index] += ch.text
    ref = offline.generate(PROMPT, SamplingParams(n=2, temperature=0.8, max_tokens=6, seed=7))[0]
    assert [texts[0], texts[1]] == [o.text for o in ref.outputs]


def test_stop_string_plain_and_streamed(client: openai.OpenAI, offline: LLM) -> None:
    full = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 2]
    assert len(stop) == 2 and stop.strip(), full.text
    expected = full.text[: full.text.index(stop)]
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0, stop=[stop])
    r = client.completions.create(**kw)
    assert r.choices[0].text == expected and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
    assert streamed == expected  # no piece of the stop string leaked into a delta


def test_batched_prompts(client: openai.OpenAI, offline: LLM) -> None:
    prompts = [PROMPT, "hello world", "the red bird"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0)
    ref = offline.generate(prompts, SamplingParams(temperature=0, max_tokens=5))
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in ref]


def test_logprobs(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=3
    )
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    # A token may be part of a UTF-8 character: it prints as U+FFFD alone.
    assert "".join(lp.tokens).replace("\ufffd", "") == r.choices[0].text.replace("\ufffd", "")
    for tok, val, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert val <= 0 and 1 <= len(top) <= 3  # distinct ids may print alike ("\ufffd")
        assert max(top.values()) == pytest.approx(val)  # greedy picked the most likely token
        assert tok in top
    c = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
        temperature=0, logprobs=True, top_logprobs=2,
    )  # fmt: skip
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)
    joined = "".join(t.token for t in content).replace("\ufffd", "")
    assert joined == c.choices[0].message.content.replace("\ufffd", "")


def test_extra_body_params(client: openai.OpenAI, offline: LLM) -> None:
    extra = {"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.2, "ignore_eos": True,
             "min_tokens": 4}  # fmt: skip
    r = client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.7, seed=3, extra_body=extra,
        presence_penalty=0.5, frequency_penalty=0.5,
    )  # fmt: skip
    ref = offline.generate(
        PROMPT,
        SamplingParams(temperature=0.7, seed=3, max_tokens=6, presence_penalty=0.5,
                       frequency_penalty=0.5, **extra),
    )[0]  # fmt: skip
    assert r.choices[0].text == ref.outputs[0].text


# ---- other endpoints ------------------------------------------------------------------------


def test_models_health_tokenize_detokenize(server: ServerThread, client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready"}
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) > 3 and tok["max_model_len"] == 256
    detok = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()
    assert detok["prompt"] == PROMPT
    chat = httpx.post(
        f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}
    ).json()
    assert chat["count"] > 2


def test_metrics_record_requests(server: ServerThread, client: openai.OpenAI) -> None:
    before = _metric(server, 'engine:requests_total{model_name="tiny",outcome="length"}')
    ttft_before = _metric(server, "engine:time_to_first_token_seconds_count")
    client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    assert (
        _metric(server, 'engine:requests_total{model_name="tiny",outcome="length"}') == before + 1
    )
    assert _metric(server, "engine:time_to_first_token_seconds_count") == ttft_before + 1
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("engine:time_per_output_token_seconds_bucket", "engine:e2e_request_latency_seconds",
                 "engine:num_requests_waiting", "engine:kv_cache_usage_perc",
                 "engine:prefix_cache_hit_rate", "engine:num_preemptions_total"):  # fmt: skip
        assert name in text


def test_metrics_under_vllm_names(server: ServerThread, client: openai.OpenAI) -> None:
    """What vLLM's dashboards read: its names, `model_name`, `finished_reason`."""
    labels = 'model_name="tiny"'
    length = f'vllm:request_success_total{{finished_reason="length",{labels}}}'
    before = {n: _metric(server, n) for n in (length, "vllm:prompt_tokens_total",
              "vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
              "vllm:time_per_output_token_seconds_count",
              "vllm:e2e_request_latency_seconds_count")}  # fmt: skip
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0)
    after = {n: _metric(server, n) for n in before}
    assert after[length] == before[length] + 1
    assert after["vllm:prompt_tokens_total"] == before["vllm:prompt_tokens_total"] + (
        r.usage.prompt_tokens
    )
    assert after["vllm:generation_tokens_total"] == before["vllm:generation_tokens_total"] + 3
    for n in list(before)[3:]:
        assert after[n] == before[n] + 1, n
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting",
                 "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc",
                 "vllm:num_preemptions_total", "vllm:time_to_first_token_seconds_bucket"):  # fmt: skip
        assert f"{name}{{" in text and labels in text, name
    assert "# TYPE vllm:request_success_total counter" in text


# ---- bad input: 400 naming the parameter, never a 500 ---------------------------------------

BAD = [
    ("/v1/completions", b'{"prompt": "x", ', None),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "the " * 400}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, "prompt"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "top_k": 0}, "top_k"),
    ("/v1/completions", {"prompt": "x", "repetition_penalty": 5}, "repetition_penalty"),
    ("/v1/completions", {"prompt": "x", "stop": [""]}, "stop"),
    ("/v1/completions", {"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 9, "max_tokens": 2}, "min_tokens"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 300}]}, "messages"),
    ("/v1/chat/completions",
     {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 10**9},
     "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"384": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ("/v1/completions", {"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/detokenize", {"tokens": [10**7]}, "tokens"),
    ("/tokenize", {}, "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_input_is_400(server: ServerThread, path: str, body: object, param: str | None) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}{path}", content=content,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param, err
    if param is not None:
        assert param in err["message"]


def test_unknown_model_is_404(server: ServerThread, client: openai.OpenAI) -> None:
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert r.status_code == 404, r.text
    err = r.json()["error"]
    assert (
        err["code"] == "model_not_found" and err["param"] == "model" and "'tiny'" in err["message"]
    )
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])


def test_logit_bias_matches_offline(client: openai.OpenAI, offline: LLM) -> None:
    greedy = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=6))[0].outputs[0]
    banned = greedy.token_ids[0]
    forced = offline.generate(
        PROMPT, SamplingParams(temperature=0, max_tokens=6, logit_bias={42: 100.0})
    )[0].outputs[0]
    assert forced.token_ids == [42] * 6
    with pytest.raises(ValueError, match="logit_bias token ids must be < the vocabulary"):
        offline.generate(PROMPT, SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101.0})
    for bias, ref in ({"42": 100}, forced), ({str(banned): -100}, None):
        r = client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0, logit_bias=bias, logprobs=0
        )
        lp = r.choices[0].logprobs
        if ref is not None:
            assert r.choices[0].text == ref.text
        else:  # the greedy token is out of reach
            assert lp.tokens[0] != offline.get_tokenizer().decode([banned])
            assert r.choices[0].text != greedy.text


def test_best_of_keeps_the_likeliest(client: openai.OpenAI) -> None:
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=11, logprobs=0)
    every = client.completions.create(n=4, **kw)  # the same 4 samples best_of draws
    sums = [sum(c.logprobs.token_logprobs) for c in every.choices]
    best = client.completions.create(n=2, extra_body={"best_of": 4}, **kw)
    ranked = sorted(range(4), key=lambda i: -sums[i])[:2]
    assert [c.text for c in best.choices] == [every.choices[i].text for i in ranked]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == every.usage.completion_tokens  # all 4 were drawn
    plain = client.completions.create(n=1, extra_body={"best_of": 4},
                                      **{**kw, "logprobs": None})  # fmt: skip
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].text == every.choices[ranked[0]].text


def test_models_retrieve_and_version(server: ServerThread, client: openai.OpenAI) -> None:
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_openai_client_sees_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=MODEL, prompt="x", top_p=2.0)


def test_unknown_route_is_openai_shaped_404(server: ServerThread) -> None:
    r = httpx.get(f"{server.url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


# ---- disconnects abort their requests -------------------------------------------------------


def _wait_idle(engine: LLMEngine, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_stream_disconnect_aborts_and_frees_blocks(server: ServerThread) -> None:
    engine = _engine_of(server)
    _wait_idle(engine)
    aborted = _metric(server, 'engine:requests_total{model_name="tiny",outcome="abort"}')
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 240, "stream": True,
            "temperature": 0, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # a few events in, then hang up
        assert any(line.startswith("data: {") for line in got)
        assert engine.has_unfinished_requests()
    _wait_idle(engine)
    assert not engine.has_unfinished_requests()
    assert engine.get_metrics().kv_blocks_used == 0 or not engine.scheduler.running
    assert engine.get_metrics().num_running == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _metric(server, 'engine:requests_total{model_name="tiny",outcome="abort"}') > aborted:
            break
        time.sleep(0.05)
    assert (
        _metric(server, 'engine:requests_total{model_name="tiny",outcome="abort"}') == aborted + 1
    )


def test_non_stream_disconnect_aborts(server: ServerThread) -> None:
    engine = _engine_of(server)
    _wait_idle(engine)
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 240, "temperature": 0,
            "ignore_eos": True}  # fmt: skip

    async def go() -> None:
        async with httpx.AsyncClient() as c:
            task = asyncio.create_task(c.post(f"{server.url}/v1/completions", json=body))
            deadline = time.monotonic() + 30
            while not engine.has_unfinished_requests() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            task.cancel()  # closes the connection mid-request
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(go())
    _wait_idle(engine, timeout=10)
    assert not engine.has_unfinished_requests()


# ---- auth and overload (a second server: API key, 1 running sequence, 1 pending slot) -------


@pytest.fixture(scope="module")
def guarded(model_dir: str) -> Iterator[ServerThread]:
    engine = LLMEngine.from_args(EngineArgs(model=model_dir, **{**ENGINE_KW, "max_num_seqs": 1}))
    with _serve(engine, api_key="sekret", max_pending=1, retry_after_s=2) as srv:
        yield srv


def test_auth(guarded: ServerThread) -> None:
    url = f"{guarded.url}/v1/models"
    assert httpx.get(url).status_code == 401
    r = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert r.headers["www-authenticate"] == "Bearer"
    assert httpx.get(url, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert httpx.get(f"{guarded.url}/health").status_code == 200  # probes need no key
    assert httpx.get(f"{guarded.url}/metrics").status_code == 401
    bad = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
    good = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="sekret", max_retries=0)
    assert good.completions.create(model=MODEL, prompt="x", max_tokens=2).usage.completion_tokens


def test_overload_gets_503_with_retry_after(
    guarded: ServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine_of(guarded)
    real_step = engine.step

    def slow_step() -> list:  # 20 ms a step: A cannot finish before B and C arrive
        time.sleep(0.02)
        return real_step()

    monkeypatch.setattr(engine, "step", slow_step)
    headers = {"Authorization": "Bearer sekret"}
    long = {"model": MODEL, "prompt": PROMPT, "max_tokens": 200, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    url = f"{guarded.url}/v1/completions"
    front = guarded.server.config.app.state.server.engine
    results: list[httpx.Response] = []
    with httpx.Client(headers=headers, timeout=60) as c:
        with c.stream("POST", url, json={**long, "stream": True}) as running:
            next(running.iter_lines())  # A has its first token: it holds the one running slot
            b_body = {**long, "max_tokens": 20}
            waiter = threading.Thread(target=lambda: results.append(c.post(url, json=b_body)))
            waiter.start()  # B waits behind A: it takes the one pending slot
            deadline = time.monotonic() + 30
            while front.num_pending == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert front.num_pending == 1
            r = c.post(url, json={**long, "max_tokens": 2})  # C: no room
            assert r.status_code == 503, r.text
            assert r.headers["retry-after"] == "2"
            assert r.json()["error"]["code"] == "server_overloaded"
        waiter.join(60)  # A hung up (aborted), so B runs to its end
    assert results and results[0].status_code == 200
    assert results[0].json()["usage"]["completion_tokens"] == 20
    assert _metric(guarded, 'engine:requests_total{model_name="tiny",outcome="rejected"}') >= 1


# ---- readiness: /health is 503 until the model is loaded ------------------------------------


def test_health_503_while_loading_then_ready(tiny_llama_dir: Path) -> None:
    release = threading.Event()

    def slow_load() -> LLMEngine:
        release.wait(60)
        return LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW))

    app = create_app(ServerConfig(served_model_name=MODEL, retry_after_s=3), slow_load)
    with ServerThread(app, wait_ready=False) as srv:
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"] == "3"
        assert r.json()["error"]["code"] == "engine_unavailable"
        release.set()
        deadline = time.monotonic() + 60
        while httpx.get(f"{srv.url}/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert httpx.get(f"{srv.url}/health").json() == {"status": "ready"}


def test_failed_load_reports_failed() -> None:
    def broken() -> LLMEngine:
        raise ValueError("no such model")

    app = create_app(ServerConfig(served_model_name=MODEL), broken)
    failures: list[BaseException] = []
    app.state.server.on_load_failure = failures.append
    with ServerThread(app, wait_ready=False) as srv:
        deadline = time.monotonic() + 30
        while not failures and time.monotonic() < deadline:
            time.sleep(0.05)
        r = httpx.get(f"{srv.url}/health")
        assert r.status_code == 503 and r.json() == {"status": "failed"}
        assert isinstance(failures[0], ValueError)
