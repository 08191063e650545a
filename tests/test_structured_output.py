"""Structured output: outputs of a random-weight model match their grammar (the masks do all
the work: unconstrained, this model writes no JSON), offline through `LLM.generate` and over
HTTP with the `openai` client against a real uvicorn server."""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest

from engine import LLM, SamplingParams
from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.structured_output import GuidedDecodingParams, StructuredOutputsParams
from tests.test_server import MODEL, ServerThread, _serve

KW = dict(max_model_len=512, num_kv_blocks=300, block_size=16, max_num_seqs=16)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"enum": ["paris", "london", "rome"]},
        "admin": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "admin", "tags"],
}
PROMPTS = [f"the cat {i} sat on the river and the dog" for i in range(8)]
CHAT = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), **KW)


def _texts(llm: LLM, so: StructuredOutputsParams, **sp: object) -> list[str]:
    params = SamplingParams(max_tokens=480, structured_outputs=so, **sp)  # type: ignore[arg-type]
    outs = llm.generate(PROMPTS, params)
    for o in outs:
        assert o.outputs[0].finish_reason == "stop", o.outputs[0].text
    return [o.outputs[0].text for o in outs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_outputs_validate(llm: LLM, temperature: float) -> None:
    for text in _texts(llm, StructuredOutputsParams(json=SCHEMA), temperature=temperature, seed=3):
        jsonschema.validate(json.loads(text), SCHEMA)


def test_unconstrained_model_writes_no_json(llm: LLM) -> None:
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=60))
    for o in outs:
        with pytest.raises(ValueError):
            json.loads(o.outputs[0].text)


def test_json_object_regex_choice_grammar(llm: LLM) -> None:
    for text in _texts(llm, StructuredOutputsParams(json_object=True), temperature=0):
        assert isinstance(json.loads(text), dict)
    regex = r"[a-z]{3,8}@[a-z]{3,6}\.com"
    for text in _texts(llm, StructuredOutputsParams(regex=regex), temperature=1.0, seed=0):
        assert re.fullmatch(regex, text), text
    choices = ["paris", "london", "rome"]
    got = _texts(llm, StructuredOutputsParams(choice=choices), temperature=1.0, seed=1)
    assert set(got) <= set(choices)
    ebnf = 'root ::= "yes" | "no" | "maybe " [0-9]'
    for text in _texts(llm, StructuredOutputsParams(grammar=ebnf), temperature=1.0, seed=2):
        assert re.fullmatch(r"yes|no|maybe [0-9]", text), text


def test_rows_without_a_grammar_are_untouched(llm: LLM) -> None:
    plain = SamplingParams(temperature=0, max_tokens=20)
    alone = llm.generate(PROMPTS, plain)
    constrained = SamplingParams(max_tokens=50, structured_outputs=StructuredOutputsParams(
        choice=["yes", "no"]))  # fmt: skip
    mixed = llm.generate([p for p in PROMPTS for _ in (0, 1)], [plain, constrained] * len(PROMPTS))
    assert [o.outputs[0].text for o in mixed[::2]] == [o.outputs[0].text for o in alone]
    assert {o.outputs[0].text for o in mixed[1::2]} <= {"yes", "no"}


def test_grammar_end_stops_even_with_ignore_eos(llm: LLM) -> None:
    so = StructuredOutputsParams(choice=["paris", "rome"])
    out = llm.generate(PROMPTS[0], SamplingParams(max_tokens=100, ignore_eos=True,
                                                  structured_outputs=so))[0]  # fmt: skip
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in ("paris", "rome")


def test_n_samples_each_follow_the_grammar(llm: LLM) -> None:
    so = StructuredOutputsParams(json=SCHEMA)
    out = llm.generate(PROMPTS[0], SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=400,
                                                  structured_outputs=so))[0]  # fmt: skip
    assert len(out.outputs) == 3
    for c in out.outputs:
        jsonschema.validate(json.loads(c.text), SCHEMA)


def test_params_forms_and_errors() -> None:
    sp = SamplingParams(structured_outputs={"choice": ["a", "b"]})
    assert isinstance(sp.structured_outputs, StructuredOutputsParams)
    old = SamplingParams(guided_decoding=GuidedDecodingParams(regex="[0-9]+"))
    assert old.structured_outputs is not None and old.structured_outputs.regex == "[0-9]+"
    assert pickle.loads(pickle.dumps(sp)).structured_outputs.key == sp.structured_outputs.key
    with pytest.raises(ValueError, match="Unsupported type"):
        StructuredOutputsParams(json={"type": "bogus"})
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="invalid regex"):
        StructuredOutputsParams(regex="(")
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutputsParams(json="{not json")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"nope": 1})


def test_compiled_grammars_are_cached(llm: LLM) -> None:
    manager = llm.llm_engine.structured_output
    a = manager.submit(StructuredOutputsParams(json=SCHEMA))
    b = manager.submit(StructuredOutputsParams(json=json.dumps(SCHEMA)))
    assert a is b and a.result() is not None


def test_a_grammar_that_fails_to_compile_ends_its_request(
    llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(key: object) -> None:
        raise RuntimeError("compiler out of memory")

    monkeypatch.setattr(llm.llm_engine.structured_output, "_compile", fail)
    bad = SamplingParams(max_tokens=5, structured_outputs={"regex": "[0-9]{7}"})
    plain = SamplingParams(temperature=0, max_tokens=5)
    outs = llm.generate([PROMPTS[0], PROMPTS[1]], [bad, plain])
    assert outs[0].outputs[0].finish_reason == "abort" and outs[0].outputs[0].text == ""
    assert outs[1].outputs[0].finish_reason == "length"
    assert not llm.llm_engine.has_unfinished_requests()
    monkeypatch.undo()  # a failed compile is not cached: the next request compiles again
    again = llm.generate(PROMPTS[0], bad)[0].outputs[0]
    assert again.finish_reason == "length" and again.text.isdigit()


# ---- over HTTP ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path) -> Iterator[ServerThread]:
    with _serve(LLMEngine.from_args(EngineArgs(model=str(tiny_llama_dir), **KW))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)


def test_response_format_json_schema(client: openai.OpenAI) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400, n=2,
                                       temperature=1.0, seed=4, response_format=fmt)  # fmt: skip
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content or ""), SCHEMA)
    stream = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400,
                                            temperature=0, response_format=fmt, stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), SCHEMA)


def test_response_format_json_object(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=400, temperature=0,
                                       response_format={"type": "json_object"})  # fmt: skip
    assert isinstance(json.loads(r.choices[0].message.content or ""), dict)


@pytest.mark.parametrize(
    ("extra", "check"),
    [
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_grammar": 'root ::= "a" [0-9]'}, lambda t: re.fullmatch("a[0-9]", t)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"json": SCHEMA, "disable_any_whitespace": True}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA) or " \n" not in t),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": SCHEMA}}},
         lambda t: jsonschema.validate(json.loads(t), SCHEMA)),
    ],
)  # fmt: skip
def test_vllm_fields_on_completions(client: openai.OpenAI, extra: dict, check) -> None:
    r = client.completions.create(model=MODEL, prompt="the cat", max_tokens=480, temperature=1.0,
                                  seed=7, extra_body=extra)  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    assert check(r.choices[0].text) is not False


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
          "schema": {"type": "bogus"}}}}, "response_format", "Unsupported type"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema.schema"),
        ({"guided_regex": "("}, "guided_regex", "parenthesis"),
        ({"guided_json": "{nope"}, "guided_json", "not valid JSON"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"structured_outputs": {"regex": "a", "foo": 1}}, "structured_outputs", "foo"),
        ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
        ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_regex", "only one"),
        ({"response_format": {"type": "xml"}}, "response_format", "json_schema"),
    ],
)  # fmt: skip
def test_bad_grammars_are_400(server: ServerThread, body: dict, param: str, words: str) -> None:
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"messages": CHAT, "max_tokens": 5, **body}, timeout=30)  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"], err


@pytest.mark.slow
def test_real_model_follows_a_schema(smollm2_gguf: Path) -> None:
    """SmolLM2-135M (GGUF: its tokenizer rebuilt from the header) asked for JSON in prose."""
    llm = LLM(str(smollm2_gguf), max_model_len=512, kv_cache_gib=0.05)
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20},
              "country": {"enum": ["France", "Italy"]}}, "required": ["capital", "country"]}  # fmt: skip
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in JSON."}]
    sp = SamplingParams(temperature=0, max_tokens=60, structured_outputs={"json": schema})
    out = llm.chat(msgs, sp)[0].outputs[0]
    assert out.finish_reason == "stop"
    jsonschema.validate(json.loads(out.text), schema)
    choice = SamplingParams(temperature=0, max_tokens=10,
                            structured_outputs={"choice": ["Paris", "Rome"]})  # fmt: skip
    assert llm.chat(msgs, choice)[0].outputs[0].text in ("Paris", "Rome")
