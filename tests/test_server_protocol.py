"""Request models of the engine server: OpenAI shapes in, SamplingParams out (no model needed)."""

from __future__ import annotations

import asyncio
import json
import pickle
from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from engine.outputs import CompletionOutput, RequestOutput
from engine.server import streaming
from engine.server.engine_process import DeltaEncoder, apply_delta
from engine.server.protocol import ChatCompletionRequest, CompletionRequest, ParamError
from engine.server.streaming import _new_part, _Sent, sse


def test_completion_defaults_follow_openai() -> None:
    req = CompletionRequest(prompt="hi")
    assert req.max_tokens == 16 and req.n == 1 and not req.stream
    sp = req.to_sampling_params(req.max_tokens, req.logprobs)
    assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens) == (1.0, 1.0, -1, 16)


def test_prompt_forms() -> None:
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]


def test_extra_params_reach_sampling_params() -> None:
    req = CompletionRequest(
        prompt="x", top_k=4, min_p=0.1, repetition_penalty=1.3, ignore_eos=True, min_tokens=2,
        stop="END", seed=5, presence_penalty=0.5, frequency_penalty=-0.5, n=2, temperature=0.3,
    )  # fmt: skip
    sp = req.to_sampling_params(8, 2)
    assert (sp.top_k, sp.min_p, sp.repetition_penalty, sp.ignore_eos, sp.min_tokens) == (
        4, 0.1, 1.3, True, 2,
    )  # fmt: skip
    assert (sp.stop, sp.seed, sp.n, sp.logprobs, sp.max_tokens) == (["END"], 5, 2, 2, 8)


def test_chat_logprobs_and_max_completion_tokens() -> None:
    req = ChatCompletionRequest(
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                             "text": "b"}]}],
        logprobs=True, top_logprobs=3, max_tokens=5, max_completion_tokens=7,
    )  # fmt: skip
    assert req.engine_logprobs() == 3 and req.requested_max_tokens() == 7
    assert req.message_dicts() == [{"role": "user", "content": "ab"}]
    assert (
        ChatCompletionRequest(messages=[{"role": "user", "content": "a"}]).engine_logprobs() is None
    )


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"n": 3, "best_of": 2}, "best_of"),
        ({"best_of": 2, "stream": True}, "best_of"),
        ({"suffix": "x"}, "suffix"),
        ({"echo": True, "logprobs": 1}, "echo"),
        ({"top_k": 0}, "top_k"),
        ({"prompt": [[1], []]}, "prompt"),
    ],
)
def test_param_errors_name_the_parameter(kwargs: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        CompletionRequest(**{"prompt": "x", **kwargs})
    cause = info.value.errors()[0]["ctx"]["error"]
    assert isinstance(cause, ParamError) and cause.param == param


def test_stream_deltas_hold_back_possible_stop_prefix() -> None:
    class C:  # a CompletionOutput's cumulative fields
        def __init__(self, text: str, n: int, finish: str | None = None) -> None:
            self.text, self.token_ids, self.logprobs, self.finish_reason = (
                text,
                [0] * n,
                None,
                finish,
            )

    sent = _Sent()
    assert _new_part(C("hello wo", 3), sent, hold=2)[0] == "hello "
    assert _new_part(C("hello wor", 4), sent, hold=2)[0] == "w"
    assert _new_part(C("hello wor", 5, "stop"), sent, hold=2)[0] == "or"
    assert sent.text == len("hello wor")


def test_a_token_with_half_a_character_still_streams_a_chunk(monkeypatch) -> None:
    """The first token's text is half of 'é' (nothing to show yet): it still gets a chunk,
    with empty text, so a client times the first token, not the first character (vLLM does
    the same)."""
    steps = [("", [7]), ("\u00e9", [7, 8]), ("\u00e9!", [7, 8, 9])]
    outs = [
        RequestOutput(
            "r", None, [1], [CompletionOutput(0, t, ids, "length" if k == 2 else None)], k == 2
        )
        for k, (t, ids) in enumerate(steps)
    ]

    async def merged(_state, _sub):
        for out in outs:
            yield 0, out

    monkeypatch.setattr(streaming, "merged", merged)
    sub = SimpleNamespace(request_id="r", created=0, model="m", streams=[None], n=1,
                          continuous_usage=False, include_usage=False)  # fmt: skip
    body = SimpleNamespace(stop_list=lambda: [])

    def chunk(i, c, text, ids, lps):
        return f'"choices":[{{"index":{i},"text":{json.dumps(text)}}}]'

    async def collect() -> list[str]:
        return [e async for e in streaming._events(None, sub, body, chunk)]

    events = "".join(asyncio.run(collect())).split("\n\n")
    texts = [json.loads(e[6:])["choices"][0]["text"] for e in events if e.startswith("data: {")]
    assert texts == ["", "\u00e9", "!"]


def _stream_of(monkeypatch, events_of, outs: list[RequestOutput]) -> list[str]:
    async def merged(_state, _sub):
        for out in outs:
            yield 0, out

    monkeypatch.setattr(streaming, "merged", merged)

    async def collect() -> list[str]:
        return [e async for e in events_of()]

    return asyncio.run(collect())


def test_stream_chunks_are_the_json_of_the_openai_objects(monkeypatch) -> None:
    """Chunks are assembled from JSON pieces: byte for byte what encoding the OpenAI chunk
    objects (compact separators, ASCII escapes) gives; the last write ends with [DONE]."""
    steps = [('he said "hi"\n', [7, 8], None), ('he said "hi"\n\u00e9\u20ac', [7, 8, 9], "length")]
    outs = [RequestOutput("r", None, [1], [CompletionOutput(0, t, ids, fin)], fin is not None)
            for t, ids, fin in steps]  # fmt: skip
    sub = SimpleNamespace(request_id="cmpl-\u00e9", created=12, model='m"1', streams=[None], n=1,
                          continuous_usage=True, include_usage=True, prompt_lens=[1],
                          last={})  # fmt: skip
    usage = {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1}
    enc = json.JSONEncoder(separators=(",", ":")).encode

    def expect(obj: str, choices: list[dict]) -> str:
        head = {"id": sub.request_id, "created": 12, "model": 'm"1', "object": obj}
        return f"data: {enc({**head, 'choices': choices, 'usage': usage})}\n\n"

    body = SimpleNamespace(stop_list=lambda: [], echo=False, logprobs=None)
    got = _stream_of(monkeypatch, lambda: streaming.completion_events(None, sub, body, []), outs)
    texts = ['he said "hi"\n', "\u00e9\u20ac"]
    want = [expect("text_completion", [{"index": 0, "text": t, "logprobs": None,
                                         "finish_reason": f}])
            for t, f in zip(texts, [None, "length"], strict=True)]  # fmt: skip
    want.append(expect("text_completion", []))
    assert got == [want[0], "".join(want[1:]) + "data: [DONE]\n\n"]

    body = SimpleNamespace(stop_list=lambda: [], engine_logprobs=lambda: None,
                           tool_mode=lambda: "none")  # fmt: skip
    got = _stream_of(monkeypatch, lambda: streaming.chat_events(None, sub, body), outs)
    role = {"id": sub.request_id, "object": "chat.completion.chunk", "created": 12, "model": 'm"1',
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}]}  # fmt: skip
    want = [f"data: {enc(role)}\n\n"]
    want += [expect("chat.completion.chunk", [{"index": 0, "delta": {"content": t},
                                               "logprobs": None, "finish_reason": f}])
             for t, f in zip(texts, [None, "length"], strict=True)]  # fmt: skip
    want.append(expect("chat.completion.chunk", []))
    assert got == [want[0], want[1], "".join(want[2:]) + "data: [DONE]\n\n"]


def test_sse_format() -> None:
    assert sse({"a": 1}) == 'data: {"a":1}\n\n'
    assert sse("[DONE]") == "data: [DONE]\n\n"


def _out(rid: str, choices: list[CompletionOutput], finished: bool = False) -> RequestOutput:
    return RequestOutput(rid, None, list(range(300)), choices, finished)


def test_engine_process_sends_deltas_that_rebuild_the_outputs() -> None:
    """Across the pipe each step carries only what it added (not the prompt, not the tokens
    already sent), and the server side rebuilds the engine's cumulative outputs exactly,
    including a stop string cut off text already sent, logprobs and n > 1."""
    steps = [
        [_out("a", [CompletionOutput(0, "He", [5], None, [{5: -0.1}], -0.1), CompletionOutput(1)])],
        [_out("a", [CompletionOutput(0, "Hello E", [5, 6], None, [{5: -0.1}, {6: -0.2}], -0.3),
                    CompletionOutput(1, "x", [9], None, [{9: -1.0}], -1.0)])],
        [_out("a", [CompletionOutput(0, "Hello", [5, 6, 7], "stop", [{5: -0.1}, {6: -0.2},
                                     {7: -0.3}], -0.6, "END"),
                    CompletionOutput(1, "x", [9], None, [{9: -1.0}], -1.0)]),
         _out("b", [CompletionOutput(0, "z", [3], "length")], finished=True)],
    ]  # fmt: skip
    enc = DeltaEncoder()
    acc: dict[str, RequestOutput] = {}
    for step in steps:
        deltas = enc.encode(step)
        for d in deltas:
            acc[d[0]] = apply_delta(acc.get(d[0]), d)
        for out in step:
            got = acc[out.request_id]
            assert got.finished == out.finished
            assert got.outputs == out.outputs
    wire = pickle.dumps(enc.encode([steps[-1][0]]))  # unchanged since the last step
    assert b"Hello" not in wire and len(wire) < 120
    second = [d for d in enc.encode(steps[1]) if d[0] == "a"]
    assert enc._sent.keys() == {"a"}  # "b" finished: forgotten
    enc.forget("a")
    assert not enc._sent and second
