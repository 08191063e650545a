"""Offline API, vLLM's: `LLM(model=PATH).generate(prompts, sampling_params)` and
`LLM.chat(messages, sampling_params)`."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine, heap_frozen
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

# vLLM's prompt forms: text, token ids, TextPrompt {"prompt": ...}, TokensPrompt
# {"prompt_token_ids": [...]}.
PromptType = str | list[int] | dict[str, Any]


def _prompt_list(prompts: Any) -> list[str | list[int]]:
    """One prompt or a list of them, as the engine takes them (text or token ids)."""
    if isinstance(prompts, str | dict) or (
        isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise ValueError(_PROMPT_FORMS + f", or a non-empty list of them; got {prompts!r:.80}")
    return [_one_prompt(p, i) for i, p in enumerate(prompts)]


_PROMPT_FORMS = (
    "a prompt must be a string, a list of token ids, {'prompt': str} or "
    "{'prompt_token_ids': [int, ...]}"
)


def _ints(xs: SequenceABC[Any]) -> bool:
    return all(isinstance(t, int) and not isinstance(t, bool) for t in xs)


def _one_prompt(p: Any, i: int) -> str | list[int]:
    if isinstance(p, str):
        return p
    if isinstance(p, list | tuple) and _ints(p):
        return list(p)
    if isinstance(p, dict):
        keys = set(p)
        if keys == {"prompt"} and isinstance(p["prompt"], str):
            return p["prompt"]
        ids = p.get("prompt_token_ids")
        if keys == {"prompt_token_ids"} and isinstance(ids, list | tuple) and _ints(ids):
            return list(ids)
        if keys - {"prompt", "prompt_token_ids"}:
            raise ValueError(
                f"prompt {i}: unsupported keys {sorted(keys - {'prompt', 'prompt_token_ids'})} "
                f"({_PROMPT_FORMS})"
            )
    raise ValueError(f"prompt {i}: {_PROMPT_FORMS}; got {p!r:.80}")


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine.from_args(EngineArgs(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: PromptType | SequenceABC[PromptType],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in input order.

        A prompt is vLLM's: a string, a list of token ids, `{"prompt": str}` (TextPrompt) or
        `{"prompt_token_ids": [...]}` (TokensPrompt); or a list of those. `use_tqdm` is
        vLLM's and only accepted (there is no progress bar)."""
        batch = _prompt_list(prompts)
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(batch)
        if len(params) != len(batch) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(
                f"sampling_params must be one SamplingParams or one per prompt ({len(batch)})"
            )
        engine = self.llm_engine
        vocab = engine.model_config.vocab_size
        for p in params:
            if any(t >= vocab for t in p.logit_bias):
                raise ValueError(f"logit_bias token ids must be < the vocabulary size {vocab}")
        ids = []
        for prompt, p in zip(batch, params, strict=True):
            request_id = f"gen-{self._counter}"
            self._counter += 1
            engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        with heap_frozen():
            while engine.has_unfinished_requests():
                for out in engine.step(only_finished=True):
                    finished[out.request_id] = out
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        sampling_params: SamplingParams | SequenceABC[SamplingParams] | None = None,
        use_tqdm: bool = False,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[RequestOutput]:
        """Apply the chat template (the model's, or `chat_template`) to one conversation or a
        list of them, then generate; the arguments are vLLM's (`tools`: OpenAI-style tool
        definitions the template renders)."""
        if not isinstance(messages, list) or not messages:
            raise ValueError("messages must be a non-empty list of messages or of conversations")
        conversations = messages if isinstance(messages[0], list) else [messages]
        tok = self.llm_engine.tokenizer
        prompts: list[PromptType] = []
        for c in conversations:
            text = tok.apply_chat_template(
                c,
                add_generation_prompt=add_generation_prompt,
                chat_template=chat_template,
                continue_final_message=continue_final_message,
                **({"tools": tools} if tools else {}),
                **(chat_template_kwargs or {}),
            )
            prompts.append(tok.encode(text, add_special_tokens=False))
        return self.generate(prompts, sampling_params)

    def shutdown(self) -> None:
        self.llm_engine.shutdown()
