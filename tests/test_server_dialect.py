"""vLLM's request fields on the engine server: each one accepted has its effect, the ones not
implemented are a 400 naming them (never accepted and ignored). A real uvicorn server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.server.protocol import UNSUPPORTED
from tests.test_server import ENGINE_KW, MODEL, PROMPT, ServerThread, _serve

CHAT = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    with _serve(LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **ENGINE_KW))) as srv:
        yield srv


def _post(server: ServerThread, path: str, body: dict[str, object]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def _tokens(server: ServerThread, **body: object) -> list[int]:
    r = _post(server, "/tokenize", body)
    assert r.status_code == 200, r.text
    return r.json()["tokens"]


def test_add_special_tokens(server: ServerThread) -> None:
    bos = 1  # the tiny tokenizer's <s>
    assert _tokens(server, prompt=PROMPT)[0] == bos  # vLLM's default for a prompt: True
    assert _tokens(server, prompt=PROMPT, add_special_tokens=False)[0] != bos
    assert _tokens(server, messages=CHAT)[0] != bos  # for messages: False (the template's own)
    assert _tokens(server, messages=CHAT, add_special_tokens=True)[0] == bos
    usage = [
        _post(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 1, **extra}).json()[
            "usage"
        ]["prompt_tokens"]
        for extra in ({}, {"add_special_tokens": False})
    ]
    assert usage[0] == usage[1] + 1
    chat = [
        _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 1, **extra}).json()[
            "usage"
        ]["prompt_tokens"]
        for extra in ({}, {"add_special_tokens": True})
    ]
    assert chat[1] == chat[0] + 1


def test_chat_template_and_its_kwargs(server: ServerThread) -> None:
    template = "{{ greeting }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    ids = _tokens(server, messages=CHAT, chat_template=template,
                  chat_template_kwargs={"greeting": "hello: "})  # fmt: skip
    assert ids == _tokens(server, prompt="hello: " + CHAT[0]["content"], add_special_tokens=False)
    r = _post(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
              "chat_template": template, "chat_template_kwargs": {"greeting": "hello: "}})  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(ids)
    bad = _post(server, "/tokenize", {"messages": CHAT, "chat_template_kwargs": {"messages": []}})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "chat_template_kwargs"
    broken = _post(server, "/v1/chat/completions", {"messages": CHAT, "chat_template": "{% for"})
    assert broken.status_code == 400 and broken.json()["error"]["param"] == "messages"
    # the model's own template still serves the next request
    assert _tokens(server, messages=CHAT) != ids


def test_continue_final_message(server: ServerThread) -> None:
    msgs = [*CHAT, {"role": "assistant", "content": "The capital is"}]
    cont = _tokens(server, messages=msgs, add_generation_prompt=False,
                   continue_final_message=True)  # fmt: skip
    closed = _tokens(server, messages=msgs, add_generation_prompt=False)
    assert closed[: len(cont)] == cont and len(closed) > len(cont)  # no <|im_end|> after it
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": cont}).json()["prompt"]
    assert text.endswith("The capital is")
    r = _post(server, "/v1/chat/completions", {"messages": msgs, "max_tokens": 2,
              "add_generation_prompt": False, "continue_final_message": True})  # fmt: skip
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(cont)
    both = _post(server, "/tokenize", {"messages": msgs, "continue_final_message": True})
    assert both.status_code == 400 and both.json()["error"]["param"] == "continue_final_message"


def test_return_token_strs(server: ServerThread) -> None:
    r = _post(server, "/tokenize", {"prompt": "the cat", "return_token_strs": True}).json()
    assert r["token_strs"][0] == "<s>" and len(r["token_strs"]) == r["count"]
    assert _post(server, "/tokenize", {"prompt": "the cat"}).json()["token_strs"] is None


def test_template_fields_do_not_apply_to_a_prompt(server: ServerThread) -> None:
    r = _post(server, "/tokenize", {"prompt": "x", "chat_template": "{{ 1 }}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template"


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_unimplemented_vllm_fields_are_400(server: ServerThread, path: str, name: str) -> None:
    base = {"prompt": PROMPT} if path == "/v1/completions" else {"messages": CHAT}
    base["max_tokens"] = 1
    value = {"use_beam_search": True, "length_penalty": 2.0, "guided_whitespace_pattern": " ",
             "return_tokens_as_token_ids": True,
             "include_stop_str_in_output": True}.get(name, {"x": 1})  # fmt: skip
    r = _post(server, path, {**base, name: value})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == name and "not supported" in err["message"]
    noop = _post(server, path, {**base, name: UNSUPPORTED[name]})  # the no-op value is fine
    assert noop.status_code == 200, noop.text


def test_openai_client_extra_body(server: ServerThread) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="guided_whitespace_pattern"):
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2,
                                       extra_body={"guided_whitespace_pattern": " "})  # fmt: skip
