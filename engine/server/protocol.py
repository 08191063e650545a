"""Request and response models of the OpenAI HTTP API (the subset the engine serves).

Field names, defaults and shapes follow OpenAI's API so unchanged OpenAI clients work; the
extra sampling knobs vLLM accepts in the body (top_k, min_p, ignore_eos, ...) are accepted too.
Range checks live here so a bad value is a 400 naming the parameter, never a 500. The shared
base (`protocol_base.py`) and the structured-output and tool models (`protocol_tools.py`)
are re-exported from here.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from engine.sampling_params import MIN_REPETITION_PENALTY, SamplingParams
from engine.server.protocol_base import (  # noqa: F401 (re-exported: the API's models in one place)
    MAX_LOGPROBS,
    MAX_N,
    Bias,
    ErrorInfo,
    ErrorResponse,
    OpenAIModel,
    ParamError,
    Penalty,
    Probability,
    StreamOptions,
    Text,
    UsageInfo,
    _unsupported,
    random_id,
)
from engine.server.protocol_tools import (  # noqa: F401
    ChatTool,
    FunctionCall,
    FunctionDefinition,
    JSONSchemaFormat,
    NamedFunction,
    NamedToolChoice,
    ResponseFormat,
    ToolCall,
    _json_or_text,
    structured_params,
)
from engine.server.tool_calls import required_schema, tool_parameters
from engine.structured_output import StructuredOutputsParams

# vLLM request fields this server does not implement, with their no-op values: any other
# value is a 400 naming the field, never silently ignored.
UNSUPPORTED: dict[str, Any] = {
    "prompt_logprobs": None,
    "guided_decoding_backend": None,
    "guided_whitespace_pattern": None,
    "structural_tag": None,
    "use_beam_search": False,
    "length_penalty": 1.0,
    "allowed_token_ids": None,
    "bad_words": None,
    "logits_processors": None,
    "truncate_prompt_tokens": None,
    "return_tokens_as_token_ids": False,
    "include_stop_str_in_output": False,
    "functions": None,
    "function_call": None,
}


def _reject_unsupported(data: Any) -> Any:
    if isinstance(data, dict):
        for name, noop in UNSUPPORTED.items():
            if data.get(name, noop) not in (noop, None):
                raise ParamError(name, "not supported by this server; omit it")
    return data


class ChatTemplateFields(OpenAIModel):
    """How messages become the prompt (vLLM's names), for chat and /tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: Text | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check_template(self) -> ChatTemplateFields:
        if self.continue_final_message and self.add_generation_prompt:
            raise ParamError(
                "continue_final_message",
                "needs add_generation_prompt: false (they exclude each other)",
            )
        taken = set(self.chat_template_kwargs or {}) & RESERVED_TEMPLATE_VARS
        if taken:
            raise ParamError(
                "chat_template_kwargs", f"{sorted(taken)} are set by the server, not here"
            )
        return self

    def template_kwargs(self) -> dict[str, Any]:
        return {
            **(self.chat_template_kwargs or {}),
            "add_generation_prompt": self.add_generation_prompt,
            "continue_final_message": self.continue_final_message,
            "chat_template": self.chat_template,
        }


RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "chat_template",
     "bos_token", "eos_token"}
)  # fmt: skip


class SamplingFields(OpenAIModel):
    """Sampling knobs common to /v1/completions and /v1/chat/completions."""

    @model_validator(mode="before")
    @classmethod
    def _check_unsupported(cls, data: Any) -> Any:
        return _reject_unsupported(data)

    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's form: token ids (as JSON object keys, so strings) to a bias in [-100, 100]
    logit_bias: dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Bias] | None = None
    user: str | None = None
    # Extra parameters (vLLM's), sent by OpenAI clients through `extra_body`.
    top_k: int | None = Field(None, ge=-1)
    min_p: Probability | None = None
    repetition_penalty: float | None = Field(None, ge=MIN_REPETITION_PENALTY, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    # Structured output: OpenAI's response_format, vLLM's structured_outputs and guided_*.
    response_format: ResponseFormat | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | Text | None = None
    guided_regex: Text | None = None
    guided_choice: list[Text] | None = None
    guided_grammar: Text | None = None
    _structured: StructuredOutputsParams | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _check_common(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ParamError("stream_options", "only allowed when stream is true")
        if self.top_k == 0:
            raise ParamError("top_k", "must be -1 (disabled) or an integer >= 1, got 0")
        if isinstance(self.stop, list) and any(not s for s in self.stop):
            raise ParamError("stop", "stop strings must be non-empty")
        self._structured = structured_params(self)
        return self

    def structured(self) -> StructuredOutputsParams | None:
        return self._structured

    def samples(self) -> int:
        """Samples per prompt the engine draws."""
        return self.n

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def to_sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        """The engine's SamplingParams (raises ValueError naming the parameter)."""
        return SamplingParams(
            n=self.samples(),
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=-1 if self.top_k is None else self.top_k,
            min_p=self.min_p or 0.0,
            repetition_penalty=self.repetition_penalty or 1.0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=None if self.seed is None else self.seed % 2**63,
            stop=self.stop_list(),
            stop_token_ids=list(self.stop_token_ids or []),
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias={int(t): b for t, b in (self.logit_bias or {}).items()},
            structured_outputs=self.structured(),
        )


# ---- /v1/completions ------------------------------------------------------------------------


class CompletionRequest(SamplingFields):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    add_special_tokens: bool = True
    best_of: int | None = Field(None, ge=1)
    suffix: Annotated[str | None, _unsupported({"type": "string", "maxLength": 0})] = None

    @model_validator(mode="after")
    def _check_completion(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of < self.n:
            raise ParamError("best_of", f"must be >= n ({self.n}), got {self.best_of}")
        if self.best_of is not None and self.best_of > MAX_N:
            raise ParamError("best_of", f"must be <= {MAX_N}, got {self.best_of}")
        if self.ranks_samples() and self.stream:
            raise ParamError("best_of", "best_of > n cannot be streamed (the best are known last)")
        if self.suffix:
            raise ParamError("suffix", "not supported by this server; omit it")
        if self.echo and self.logprobs is not None:
            raise ParamError("echo", "echo together with logprobs is not supported")
        p = self.prompt
        if isinstance(p, list) and (not p or any(isinstance(x, list) and not x for x in p)):
            raise ParamError("prompt", "must not be empty")
        if isinstance(p, list) and p and isinstance(p[0], int) and any(t < 0 for t in p):
            raise ParamError("prompt", "token ids must be >= 0")
        return self

    def ranks_samples(self) -> bool:
        """best_of > n: sample best_of, answer the n with the highest cumulative logprob."""
        return self.best_of is not None and self.best_of > self.n

    def samples(self) -> int:
        return self.best_of if self.ranks_samples() else self.n  # type: ignore[return-value]

    def engine_logprobs(self) -> int | None:
        """Ranking needs each chosen token's logprob, asked for or not."""
        return 0 if self.logprobs is None and self.ranks_samples() else self.logprobs

    def prompts(self) -> list[str | list[int]]:
        """The batch of prompts: one string or token list per entry."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class CompletionLogProbs(OpenAIModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class CompletionResponseChoice(OpenAIModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionResponseChoice]
    usage: UsageInfo | None = None


# ---- /v1/chat/completions -------------------------------------------------------------------


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: Text


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[TextContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: Text | None = None  # a tool message: the call it answers

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template reads it (a call's arguments as an object, as
        templates expect them)."""
        d: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            d["name"] = self.name
        if self.tool_call_id is not None:
            d["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name,
                 "arguments": _json_or_text(c.function.arguments)}}
                for c in self.tool_calls
            ]  # fmt: skip
        return d


class ChatCompletionRequest(SamplingFields, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    add_special_tokens: bool = False  # the template writes BOS itself
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[ChatTool] | None = None
    # default: "auto" with tools, "none" without (OpenAI's)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @model_validator(mode="after")
    def _check_chat(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ParamError("top_logprobs", "requires logprobs to be true")
        choice = self.tool_choice
        if choice not in (None, "none") and not self.tools:
            raise ParamError("tool_choice", "needs tools")
        if isinstance(choice, NamedToolChoice):
            names = [t.function.name for t in self.tools or []]
            if choice.function.name not in names:
                raise ParamError(
                    "tool_choice", f"names {choice.function.name!r}, not one of the tools {names}"
                )
        mode = self.tool_mode()
        if mode in ("required", "named"):
            if self._structured is not None:
                raise ParamError("tool_choice", f"{mode} cannot be combined with "
                                 "response_format, structured_outputs or guided_*")  # fmt: skip
            named = self.named_tool()
            schema = (
                tool_parameters(named.function.parameters)
                if named is not None
                else required_schema(
                    [(t.function.name, t.function.parameters) for t in self.tools or []],
                    self.parallel_tool_calls,
                )
            )
            try:
                self._structured = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
            except ValueError as e:
                raise ParamError("tools", str(e).removeprefix("structured_outputs: ")) from None
        return self

    def tool_mode(self) -> str:
        """none | auto | required | named."""
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice):
            return "named"
        return choice or ("auto" if self.tools else "none")

    def named_tool(self) -> ChatTool | None:
        choice = self.tool_choice
        if not isinstance(choice, NamedToolChoice):
            return None
        return next(t for t in self.tools or [] if t.function.name == choice.function.name)

    def template_kwargs(self) -> dict[str, Any]:
        kwargs = super().template_kwargs()
        if self.tools:
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return kwargs

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def engine_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages]


class ChatLogProb(OpenAIModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogProbsContent(ChatLogProb):
    top_logprobs: list[ChatLogProb] = Field(default_factory=list)


class ChatCompletionLogProbs(OpenAIModel):
    content: list[ChatLogProbsContent] | None = None


class ChatResponseMessage(OpenAIModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)


class ChatCompletionResponseChoice(OpenAIModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatCompletionLogProbs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionResponseChoice]
    usage: UsageInfo | None = None


# ---- /v1/models, /tokenize, /detokenize -----------------------------------------------------


class ModelCard(OpenAIModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "skybroker"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(OpenAIModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeRequest(ChatTemplateFields):
    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "properties": {"prompt": {"type": "string"}}},
                {"required": ["messages"], "properties": {"messages": {"type": "array"}}},
            ]
        }
    )
    model: str | None = None
    prompt: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # vLLM's defaults: a prompt gets BOS, templated messages carry their own
    add_special_tokens: bool | None = None
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ParamError("prompt", "give exactly one of prompt or messages")
        if self.prompt is not None:
            for name in ("chat_template", "chat_template_kwargs", "continue_final_message"):
                if getattr(self, name):
                    raise ParamError(name, "only applies to messages, not to a prompt")
        return self

    def message_dicts(self) -> list[dict[str, Any]]:
        return [m.as_dict() for m in self.messages or []]


class TokenizeResponse(OpenAIModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


class DetokenizeResponse(OpenAIModel):
    prompt: str
