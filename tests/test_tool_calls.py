"""Tool calls: the parsers on the formats models write, and chat completions with tools over
HTTP with the `openai` client (the random tiny Llama, so required and named calls rest on the
grammar; an "auto" call is written by a regex-constrained output in Hermes' format)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.server.tool_calls import ToolStreamer, parse, parse_hermes, parse_llama3_json
from tests.engine_process import free_port, start_engine, wait_healthy
from tests.test_server import MODEL, ServerThread, _serve

KW = dict(max_model_len=512, num_kv_blocks=200, block_size=16, max_num_seqs=8)
CHAT = [{"role": "user", "content": "what is the weather in paris"}]
WEATHER = {"type": "object", "properties": {"city": {"enum": ["paris", "rome"]},
           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"]}  # fmt: skip
ADD = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
       "b": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["a", "b"]}  # fmt: skip
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "forecast",
                                      "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]  # fmt: skip
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
# A Hermes-style template (as Qwen 2.5's, shorter: the tiny model's context is 512 tokens):
# the tools are listed in the system turn.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}\n"
    "{{ t.function.name }}({{ t.function.parameters.properties | list | join(', ') }})"
    "{% endfor %}\n</tools><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>\n"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}\n</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HERMES_CALL = (
    r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "(paris|rome)", '
    r'"days": [1-7]\}\}\n</tool_call>'
)


# ---- parsers --------------------------------------------------------------------------------


def test_hermes_parser() -> None:
    text = ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "rome"}}\n'
            '</tool_call>\n<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>')  # fmt: skip
    content, calls = parse_hermes(text)
    assert content == "Let me check. "
    assert calls == [("get_weather", '{"city": "rome"}'), ("add", '{"a": 1, "b": 2}')]
    assert parse_hermes("no calls here") == ("no calls here", [])
    assert parse_hermes("<tool_call>{broken</tool_call>") == ("<tool_call>{broken</tool_call>", [])


def test_llama3_json_parser() -> None:
    text = ' <|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
    text += '{"name": "get_weather", "parameters": {"city": "paris"}}'
    assert parse_llama3_json(text) == (
        None, [("add", '{"a": 1, "b": 2}'), ("get_weather", '{"city": "paris"}')]
    )  # fmt: skip
    assert parse_llama3_json("The answer is 3.") == ("The answer is 3.", [])
    assert parse_llama3_json('{"not": "a call"}') == ('{"not": "a call"}', [])


@pytest.mark.parametrize(
    ("mode", "parser", "text"),
    [
        ("auto", "hermes", 'Sure. <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
                           ' <tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'),
        ("auto", "hermes", "plain words with a < sign and <tool no call"),
        ("auto", "llama3_json", '{"name": "add", "parameters": {"a": 1}}'),
        ("auto", "llama3_json", "  just text"),
        ("required", None, '[{"name": "add", "parameters": {"a": 1}}]'),
    ],
)  # fmt: skip
def test_streamed_equals_whole(mode: str, parser: str | None, text: str) -> None:
    streamer = ToolStreamer(mode, parser)
    content, calls = "", []
    for i, ch in enumerate(text):
        c, new, _ = streamer.feed(ch, i == len(text) - 1)
        content += c
        calls += new
    whole_content, whole_calls = parse(mode, parser, text, None)
    assert calls == whole_calls
    assert content.strip() == (whole_content or "").strip()


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **KW))
    with _serve(engine, enable_auto_tool_choice=True, tool_call_parser="hermes") as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def _create(client: openai.OpenAI, **kw: object):
    base = dict(model=MODEL, messages=CHAT, max_tokens=300, temperature=1.0, seed=3, tools=TOOLS,
                extra_body={"chat_template": TOOL_TEMPLATE})  # fmt: skip
    extra = kw.pop("extra_body", {})
    base["extra_body"] = {**base["extra_body"], **extra}  # type: ignore[dict-item]
    return client.chat.completions.create(**{**base, **kw})  # type: ignore[arg-type]


def _streamed_calls(stream) -> tuple[str, dict[int, dict], str | None]:
    content, calls, reason = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
            call["id"] = tc.id or call["id"]
            if tc.function is not None:
                call["name"] = tc.function.name or call["name"]
                call["arguments"] += tc.function.arguments or ""
        reason = chunk.choices[0].finish_reason or reason
    return content, calls, reason


def test_tools_reach_the_template(client: openai.OpenAI) -> None:
    without = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=1,
                                             extra_body={"chat_template": TOOL_TEMPLATE})  # fmt: skip
    with_tools = _create(client, max_tokens=1, tool_choice="none")
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20
    assert with_tools.choices[0].message.tool_calls in (None, [])


@pytest.mark.parametrize("parallel", [True, False])
def test_required_always_parses(client: openai.OpenAI, parallel: bool) -> None:
    for seed in range(3):
        r = _create(client, tool_choice="required", seed=seed, parallel_tool_calls=parallel)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = choice.message.tool_calls or []
        assert calls and (parallel or len(calls) == 1)
        for call in calls:
            assert call.id.startswith("call_") and call.type == "function"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    content, streamed, reason = _streamed_calls(_create(client, tool_choice="required",
                                                        stream=True))  # fmt: skip
    assert reason == "tool_calls" and not content and streamed
    for call in streamed.values():
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_named_function(client: openai.OpenAI) -> None:
    named = {"type": "function", "function": {"name": "add"}}
    r = _create(client, tool_choice=named)
    (call,) = r.choices[0].message.tool_calls or []
    assert call.function.name == "add" and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(call.function.arguments), ADD)
    content, streamed, reason = _streamed_calls(_create(client, tool_choice=named, stream=True))
    assert reason == "stop" and not content and list(streamed) == [0]
    assert streamed[0]["name"] == "add" and streamed[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(streamed[0]["arguments"]), ADD)


def test_auto_parses_the_models_calls(client: openai.OpenAI) -> None:
    extra = {"guided_regex": r"I will check\. " + HERMES_CALL}
    r = _create(client, extra_body=extra)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "I will check. "
    (call,) = choice.message.tool_calls or []
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)
    content, streamed, reason = _streamed_calls(_create(client, extra_body=extra, stream=True))
    assert reason == "tool_calls" and content == "I will check. "
    assert [c["name"] for c in streamed.values()] == ["get_weather"]
    # without a call in the output, auto answers with content
    plain = _create(client, extra_body={"guided_choice": ["it is sunny"]})
    assert plain.choices[0].message.content == "it is sunny"
    assert plain.choices[0].finish_reason == "stop" and not plain.choices[0].message.tool_calls


def test_tool_results_in_the_conversation(client: openai.OpenAI) -> None:
    history = [
        *CHAT,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "paris", "days": 1}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    r = _create(client, messages=history, tool_choice="none", max_tokens=3)
    assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tools": None, "tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": "required", "guided_regex": "a"}, "tool_choice"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools"),
        ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f",
          "parameters": {"type": "bogus"}}}]}, "tools"),
    ],
)  # fmt: skip
def test_bad_tool_requests_are_400(server: ServerThread, body: dict, param: str) -> None:
    req = {"messages": CHAT, "max_tokens": 5, "tools": TOOLS, **body}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=req, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_auto_needs_the_server_flags(tiny_llama_dir: Path) -> None:
    engine = LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **KW))
    with _serve(engine) as srv:
        r = httpx.post(f"{srv.url}/v1/chat/completions",
                       json={"messages": CHAT, "tools": TOOLS, "max_tokens": 2})  # fmt: skip
        assert r.status_code == 400 and "--enable-auto-tool-choice" in r.text
        ok = httpx.post(f"{srv.url}/v1/chat/completions", timeout=30,
                        json={"messages": CHAT, "tools": TOOLS, "max_tokens": 2,
                              "tool_choice": "none"})  # fmt: skip
        assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_engine_process_with_the_parser_flags(tiny_llama_dir: Path) -> None:
    """`python -m engine.serve` with the engine in its own process: grammars travel in the
    pickled SamplingParams, the flags enable auto."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_engine(
        "--model", str(tiny_llama_dir), "--port", str(port), "--max-model-len", "512",
        "--kv-cache-gib", "0.05", "--served-model-name", MODEL,
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
    )  # fmt: skip
    try:
        wait_healthy(proc, url)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        r = _create(client, extra_body={"guided_regex": r"I will check\. " + HERMES_CALL})
        assert r.choices[0].finish_reason == "tool_calls"
        assert [c.function.name for c in r.choices[0].message.tool_calls or []] == ["get_weather"]
        r = _create(client, tool_choice="required", tools=TOOLS)
        for call in r.choices[0].message.tool_calls or []:
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    finally:
        proc.terminate()
        proc.wait(60)


def test_offline_chat_renders_tools(tiny_llama_dir: Path) -> None:
    from engine import LLM, SamplingParams

    llm = LLM(str(tiny_llama_dir), **KW)
    sp = SamplingParams(max_tokens=1)
    plain = llm.chat(CHAT, sp, chat_template=TOOL_TEMPLATE)[0]
    with_tools = llm.chat(CHAT, sp, chat_template=TOOL_TEMPLATE, tools=TOOLS)[0]
    text = llm.get_tokenizer().decode(with_tools.prompt_token_ids, skip_special_tokens=False)
    assert "get_weather(city, days)" in text and "<tools>" not in llm.get_tokenizer().decode(
        plain.prompt_token_ids, skip_special_tokens=False
    )
