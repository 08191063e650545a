"""The non-streaming completions and chat-completions responses, and what stream chunks share
with them: logprobs as OpenAI writes them and the tool-call finish reason.

Choice index = prompt index * n + sample index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.server.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    FunctionCall,
    ToolCall,
)
from engine.server.submission import Submitted, merged, usage_of
from engine.server.tool_calls import parse

if TYPE_CHECKING:
    from engine.llm_engine import CompletionOutput
    from engine.server.app import ServerState


# ---- logprobs -------------------------------------------------------------------------------


# vLLM's floor: JSON has no -inf (a banned token's logprob) and no NaN.
MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    """A logprob JSON can carry: -inf and NaN become MIN_LOGPROB."""
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB


def _top(lp: dict[int, float], k: int) -> list[tuple[int, float]]:
    return sorted(((t, finite(v)) for t, v in lp.items()), key=lambda kv: -kv[1])[:k]


def completion_logprobs(
    state: ServerState,
    token_ids: list[int],
    logprobs: list[dict[int, float]],
    k: int,
    offset: int,
) -> CompletionLogProbs:
    out = CompletionLogProbs()
    for tid, lp in zip(token_ids, logprobs, strict=False):
        text = state.token_text(tid)
        out.tokens.append(text)
        chosen = lp.get(tid)
        out.token_logprobs.append(None if chosen is None else finite(chosen))
        top: dict[str, float] = {}
        for t, v in _top(lp, k):  # ids that print alike keep their highest logprob
            top.setdefault(state.token_text(t), v)
        out.top_logprobs.append(top if k else None)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def chat_logprobs(
    state: ServerState, token_ids: list[int], logprobs: list[dict[int, float]], k: int
) -> ChatCompletionLogProbs:
    content = []
    for tid, lp in zip(token_ids, logprobs, strict=False):
        text = state.token_text(tid)
        top = [
            ChatLogProb(token=(s := state.token_text(t)), logprob=v, bytes=list(s.encode()))
            for t, v in _top(lp, k)
        ]
        content.append(
            ChatLogProbsContent(
                token=text,
                logprob=finite(lp.get(tid, MIN_LOGPROB)),
                bytes=list(text.encode()),
                top_logprobs=top,
            )
        )
    return ChatCompletionLogProbs(content=content)


# ---- non-streaming responses ----------------------------------------------------------------


async def _drain(state: ServerState, sub: Submitted) -> None:
    async for _ in merged(state, sub):
        pass


async def completion_response(
    state: ServerState, sub: Submitted, body: CompletionRequest, echo_texts: list[str]
) -> CompletionResponse:
    await _drain(state, sub)
    choices = []
    for p, out in sorted(sub.last.items()):
        outputs = sorted(out.outputs, key=lambda c: c.index)
        if body.ranks_samples():
            outputs = sorted(outputs, key=_cumulative_logprob, reverse=True)[: body.n]
        for rank, c in enumerate(outputs):
            text = echo_texts[p] + c.text if body.echo else c.text
            lps = None
            if body.logprobs is not None and c.logprobs is not None:
                lps = completion_logprobs(state, c.token_ids, c.logprobs, body.logprobs, 0)
            choices.append(
                CompletionResponseChoice(
                    index=p * sub.n + rank,
                    text=text,
                    logprobs=lps,
                    finish_reason=c.finish_reason,
                )
            )
    choices.sort(key=lambda ch: ch.index)
    return CompletionResponse(
        id=sub.request_id,
        created=sub.created,
        model=sub.model,
        choices=choices,
        usage=usage_of(sub),
    )


def tool_setup(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[str, str | None, str | None]:
    """(tool mode, the server's tool-call parser, the named function's name)."""
    mode = body.tool_mode()
    if mode == "none":
        return mode, None, None
    named = body.named_tool()
    return mode, state.config.tool_call_parser, named and named.function.name


def tool_finish(reason: str | None, mode: str, called: bool) -> str | None:
    """OpenAI's finish reason: "tool_calls" when the model called tools (a named function's
    call ends with "stop", as OpenAI's does)."""
    return "tool_calls" if called and reason == "stop" and mode != "named" else reason


def _cumulative_logprob(c: CompletionOutput) -> float:
    return sum(lp[t] for t, lp in zip(c.token_ids, c.logprobs or [], strict=False))


async def chat_response(
    state: ServerState, sub: Submitted, body: ChatCompletionRequest
) -> ChatCompletionResponse:
    await _drain(state, sub)
    k = body.engine_logprobs()
    mode, parser, name = tool_setup(state, body)
    choices = []
    for c in sorted(sub.last[0].outputs, key=lambda c: c.index):
        lps = None
        if k is not None and c.logprobs is not None:
            lps = chat_logprobs(state, c.token_ids, c.logprobs, k)
        content, calls = parse(mode, parser, c.text, name)
        tool_calls = [ToolCall(function=FunctionCall(name=n, arguments=a)) for n, a in calls]
        choices.append(
            ChatCompletionResponseChoice(
                index=c.index,
                message=ChatResponseMessage(content=content, tool_calls=tool_calls),
                logprobs=lps,
                finish_reason=tool_finish(c.finish_reason, mode, bool(calls)),
            )
        )
    return ChatCompletionResponse(
        id=sub.request_id,
        created=sub.created,
        model=sub.model,
        choices=choices,
        usage=usage_of(sub),
    )
