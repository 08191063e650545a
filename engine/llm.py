"""Offline API: `LLM(model=PATH).generate(prompts, params)` and `LLM.chat(messages, params)`."""

from __future__ import annotations

from collections.abc import Sequence as SequenceABC
from typing import Any

from engine.config import EngineArgs
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    def __init__(self, model: str, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine.from_args(EngineArgs(model=model, **engine_args))
        self._counter = 0

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | SequenceABC[str | list[int]],
        params: SamplingParams | SequenceABC[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion with continuous batching; outputs in input order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(
                f"params must be one SamplingParams or one per prompt ({len(prompts)})"
            )
        engine = self.llm_engine
        ids = []
        for prompt, p in zip(prompts, params, strict=True):
            request_id = f"gen-{self._counter}"
            self._counter += 1
            engine.add_request(request_id, prompt, p)
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        while engine.has_unfinished_requests():
            for out in engine.step(only_finished=True):
                finished[out.request_id] = out
        return [finished[i] for i in ids]

    def chat(
        self,
        messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
        params: SamplingParams | None = None,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation (or a list of them), generate."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        tok = self.llm_engine.tokenizer
        prompts = [
            tok.encode(tok.apply_chat_template(c, add_generation_prompt), add_special_tokens=False)
            for c in conversations
        ]
        return self.generate(prompts, params)

    def shutdown(self) -> None:
        self.llm_engine.shutdown()
