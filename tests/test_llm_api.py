"""The offline `LLM` API takes vLLM's prompt forms and keyword names (issue 26, item 4)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM, SamplingParams

SP = SamplingParams(temperature=0, max_tokens=5)
CHAT = [{"role": "user", "content": "what is the capital of france"}]


@pytest.fixture(scope="module")
def llm(tiny_llama_dir: Path) -> LLM:
    return LLM(str(tiny_llama_dir), max_model_len=256, num_kv_blocks=64, block_size=16)


def _texts(outs: list) -> list[str]:
    return [o.outputs[0].text for o in outs]


def test_prompt_forms_agree(llm: LLM) -> None:
    ids = llm.get_tokenizer().encode("the cat sat")
    want = _texts(llm.generate("the cat sat", SP))
    assert _texts(llm.generate({"prompt": "the cat sat"}, SP)) == want  # TextPrompt
    assert _texts(llm.generate({"prompt_token_ids": ids}, SP)) == want  # TokensPrompt
    assert _texts(llm.generate(ids, sampling_params=SP)) == want
    mixed = llm.generate(["the cat sat", {"prompt": "the dog"}, {"prompt_token_ids": ids}], SP)
    assert _texts(mixed)[0] == _texts(mixed)[2] == want[0]
    assert _texts(mixed)[1] == _texts(llm.generate("the dog", SP))[0]
    assert llm.generate({"prompt": "the cat sat"}, SP)[0].prompt_token_ids == ids


@pytest.mark.parametrize(
    ("prompts", "words"),
    [
        ({"text": "hi"}, "unsupported keys ['text']"),
        ({"prompt": 3}, "prompt 0"),
        ({"prompt": "a", "prompt_token_ids": [1]}, "prompt 0"),
        ({"prompt_token_ids": ["a"]}, "prompt 0"),
        (["ok", 3.5], "prompt 1"),
        ([], "non-empty list"),
        (None, "a prompt must be"),
    ],
)
def test_other_prompts_are_a_clear_error(llm: LLM, prompts: object, words: str) -> None:
    with pytest.raises(ValueError, match="prompt") as info:
        llm.generate(prompts, SP)  # type: ignore[arg-type]
    assert words in str(info.value)


def test_sampling_params_keyword_and_list(llm: LLM) -> None:
    a, b = SamplingParams(temperature=0, max_tokens=2), SamplingParams(temperature=0, max_tokens=4)
    outs = llm.generate(["x y", "x y"], sampling_params=[a, b], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [2, 4]
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(["x", "y"], [a])


def test_chat_takes_vllm_arguments(llm: LLM) -> None:
    plain = llm.chat(CHAT, sampling_params=SP)[0]
    both = llm.chat([CHAT, CHAT], SP)
    assert _texts(both) == [plain.outputs[0].text] * 2
    template = "{{ lead }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    own = llm.chat(CHAT, SP, chat_template=template, chat_template_kwargs={"lead": "q: "})[0]
    tok = llm.get_tokenizer()
    assert own.prompt_token_ids == tok.encode("q: " + CHAT[0]["content"], add_special_tokens=False)
    msgs = [*CHAT, {"role": "assistant", "content": "The capital is"}]
    cont = llm.chat(msgs, SP, add_generation_prompt=False, continue_final_message=True)[0]
    assert tok.decode(cont.prompt_token_ids).endswith("The capital is")
    with pytest.raises(ValueError, match="exclude each other"):
        llm.chat(msgs, SP, continue_final_message=True)
