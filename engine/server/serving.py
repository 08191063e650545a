"""The completions and chat-completions logic: prompts in, OpenAI responses or SSE chunks out.

Engine outputs are cumulative (text and token ids so far), so stream deltas are the suffix past
what was already sent for each choice. Choice index = prompt index * n + sample index.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.server.async_engine import EngineDeadError, RequestStream
from engine.server.errors import APIError, bad_request
from engine.server.protocol import (
    ChatCompletionLogProbs,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatLogProb,
    ChatLogProbsContent,
    ChatResponseMessage,
    ChatTemplateFields,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    CompletionResponseChoice,
    FunctionCall,
    SamplingFields,
    ToolCall,
    UsageInfo,
    random_id,
)
from engine.server.tool_calls import Call, ToolStreamer, parse
from engine.tokenizer import LONG_TEXT

if TYPE_CHECKING:
    from engine.llm_engine import CompletionOutput, RequestOutput
    from engine.server.app import ServerState

T = TypeVar("T")
logger = logging.getLogger("engine.server")


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


# ---- prompt preparation ---------------------------------------------------------------------


async def encode_text(state: ServerState, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids of `text`. A long text is encoded on a worker thread (with the GIL released,
    see EngineTokenizer.encode), so the event loop, /health included, keeps answering."""
    tokenizer = state.tokenizer
    if len(text) < LONG_TEXT:
        return tokenizer.encode(text, add_special_tokens=add_special_tokens)
    return await asyncio.to_thread(tokenizer.encode, text, add_special_tokens)


async def encode_prompt(
    state: ServerState, prompt: str | list[int], param: str, add_special_tokens: bool = True
) -> list[int]:
    """Token ids of a prompt, checked against the vocabulary and the context length.

    Chat prompts come templated (BOS included), so they are encoded without special tokens,
    as the offline `LLM.chat` does.
    """
    if isinstance(prompt, str):
        ids = await encode_text(state, prompt, add_special_tokens)
    else:
        ids = list(prompt)
        vocab = state.vocab_size
        if vocab is not None and any(t >= vocab for t in ids):
            raise bad_request(f"{param}: token ids must be < vocabulary size {vocab}", param)
    if not ids:
        raise bad_request(f"{param}: the prompt must not be empty", param)
    if len(ids) >= state.max_model_len:
        raise bad_request(
            f"{param}: the prompt is {len(ids)} tokens; this model's maximum context length is "
            f"{state.max_model_len} tokens (prompt plus completion)",
            param,
            code="context_length_exceeded",
        )
    return ids


def max_tokens_for(state: ServerState, prompt_len: int, requested: int | None) -> int:
    room = state.max_model_len - prompt_len
    if requested is None:
        return room
    if requested > room:
        raise bad_request(
            f"max_tokens: this model's maximum context length is {state.max_model_len} tokens; "
            f"you requested {prompt_len + requested} tokens ({prompt_len} in the prompt, "
            f"{requested} for the completion); lower max_tokens to at most {room}",
            "max_tokens",
            code="context_length_exceeded",
        )
    return requested


def check_model(state: ServerState, model: str | None) -> None:
    """404 for a model this server does not serve (OpenAI's and vLLM's status for it)."""
    if model is not None and model != state.config.served_model_name:
        raise APIError(
            404,
            f"model: the model {model!r} does not exist; this server serves "
            f"{state.config.served_model_name!r}",
            "not_found_error",
            "model",
            code="model_not_found",
        )


def chat_prompt(
    state: ServerState, body: ChatTemplateFields, messages: list[dict[str, Any]]
) -> str:
    try:
        return state.tokenizer.apply_chat_template(messages, **body.template_kwargs())
    except Exception as e:  # template errors (e.g. roles that must alternate) are the input's
        raise bad_request(f"messages: cannot apply the chat template: {e}", "messages") from e


@dataclass
class Submitted:
    """The engine requests behind one HTTP request (one per prompt), plus bookkeeping."""

    request_id: str
    model: str
    created: int
    n: int
    streams: list[RequestStream]
    arrival: float
    prompt_lens: list[int]
    include_usage: bool = False
    continuous_usage: bool = False
    last: dict[int, RequestOutput] = field(default_factory=dict)


async def submit(
    state: ServerState,
    body: SamplingFields,
    prefix: str,
    prompts: list[list[int]],
    requested_max: int | None,
    logprobs: int | None,
) -> Submitted:
    """Validate and queue every prompt; on any failure undo what was queued."""
    params = []
    for ids in prompts:
        try:
            params.append(
                body.to_sampling_params(max_tokens_for(state, len(ids), requested_max), logprobs)
            )
        except ValueError as e:
            raise bad_request(str(e), _param_of(str(e))) from e
    vocab = state.vocab_size
    if vocab is not None and params and any(t >= vocab for t in params[0].logit_bias):
        raise bad_request(f"logit_bias: token ids must be < vocabulary size {vocab}", "logit_bias")
    engine = state.require_engine()
    request_id = random_id(prefix)
    arrival = time.time()
    engine_arrival = time.monotonic()  # the engine's clock
    streams: list[RequestStream] = []
    try:
        for i, (ids, sp) in enumerate(zip(prompts, params, strict=True)):
            sub_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
            streams.append(await engine.add_request(sub_id, ids, sp, engine_arrival))
    except BaseException:
        for s in streams:
            s.close()
        raise
    opts = body.stream_options
    return Submitted(
        request_id,
        state.config.served_model_name,
        int(arrival),
        body.n,
        streams,
        arrival,
        [len(p) for p in prompts],
        bool(opts and opts.include_usage),
        bool(opts and opts.continuous_usage_stats),
    )


def _param_of(message: str) -> str | None:
    head = message.split(" ", 1)[0]
    return head if head.isidentifier() else None


# ---- reading outputs ------------------------------------------------------------------------


async def _observed(state: ServerState, sub: Submitted, idx: int) -> AsyncIterator[RequestOutput]:
    """One engine request's outputs; records its metrics and aborts it if left unfinished."""
    stream = sub.streams[idx]
    ttft: float | None = None
    outcome = "abort"  # unless it finishes or the engine fails
    try:
        async for out in stream:
            if ttft is None and any(c.token_ids for c in out.outputs):
                ttft = time.time() - sub.arrival
            sub.last[idx] = out
            if out.finished:
                outcome = _outcome(out)
            yield out
    except EngineDeadError:
        outcome = "error"
        raise
    finally:
        stream.close()
        outs = sub.last[idx].outputs if idx in sub.last else []
        state.metrics.observe_finished(
            outcome,
            sub.prompt_lens[idx],
            [len(c.token_ids) for c in outs],
            ttft,
            time.time() - sub.arrival,
        )


def _outcome(out: RequestOutput) -> str:
    reasons = {c.finish_reason for c in out.outputs}
    for r in ("abort", "length", "stop"):
        if r in reasons:
            return r
    return "stop"


async def merged(state: ServerState, sub: Submitted) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) pairs of all of a request's engine requests, as they come."""
    gens = [_observed(state, sub, i) for i in range(len(sub.streams))]
    try:
        if len(gens) == 1:
            async for out in gens[0]:
                yield 0, out
            return
        q: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

        async def pump(i: int) -> None:
            try:
                async for out in gens[i]:
                    q.put_nowait((i, out))
            except Exception as e:
                q.put_nowait((i, e))
            finally:
                q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i)) for i in range(len(gens))]
        try:
            remaining = len(gens)
            while remaining:
                i, item = await q.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for g in gens:
            await g.aclose()


def usage_of(sub: Submitted) -> UsageInfo:
    prompt = sum(sub.prompt_lens)
    completion = sum(len(c.token_ids) for out in sub.last.values() for c in out.outputs)
    return UsageInfo(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client leaves."""
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # cancel() only asks: wait until the work has unwound (aborted its requests)
            await asyncio.wait({task})
    if task.cancelled():
        raise ClientDisconnected
    return task.result()


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


def _tool_setup(
    state: ServerState, body: ChatCompletionRequest
) -> tuple[str, str | None, str | None]:
    """(tool mode, the server's tool-call parser, the named function's name)."""
    mode = body.tool_mode()
    if mode == "none":
        return mode, None, None
    named = body.named_tool()
    return mode, state.config.tool_call_parser, named and named.function.name


def _tool_finish(reason: str | None, mode: str, called: bool) -> str | None:
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
    mode, parser, name = _tool_setup(state, body)
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
                finish_reason=_tool_finish(c.finish_reason, mode, bool(calls)),
            )
        )
    return ChatCompletionResponse(
        id=sub.request_id,
        created=sub.created,
        model=sub.model,
        choices=choices,
        usage=usage_of(sub),
    )


# ---- streaming ------------------------------------------------------------------------------


class SSEResponse(StreamingResponse):
    """Server-sent events; closing the body generator always runs (and so aborts requests).

    Streams on the request's own task, with a plain asyncio watcher for the client's
    disconnect (which cancels it), not Starlette's anyio task group per response; the write
    with [DONE] ends the body too, so a stream ends in one socket write, not two.
    """

    media_type = "text/event-stream"

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._gen = content

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        state = {"streaming": True, "disconnected": False}

        def on_disconnect(watcher: asyncio.Task[None]) -> None:
            if not watcher.cancelled() and state["streaming"]:
                state["disconnected"] = True
                task.cancel()

        watcher = asyncio.ensure_future(_wait_disconnect(receive))
        watcher.add_done_callback(on_disconnect)
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})  # fmt: skip
            more = True
            async for chunk in self._gen:
                more = not chunk.endswith(_DONE)  # the stream's last write ends the body too
                await send({"type": "http.response.body", "body": chunk.encode(),
                            "more_body": more})  # fmt: skip
            if more:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"]:
                raise
            task.uncancel()  # the client left: a normal end for this request
        finally:
            state["streaming"] = False
            watcher.cancel()
            await self._gen.aclose()  # type: ignore[attr-defined]


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


# One encoder for every chunk: json.dumps with non-default separators builds a new
# JSONEncoder on each call, a cost paid once per streamed token.
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode
# A str as JSON, as _ENCODE writes it (ASCII, escaped): chunks are assembled from pieces.
_STR = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else _ENCODE(data)}\n\n"


_DONE = sse("[DONE]")


def _json_or_null(value: str | None) -> str:
    return "null" if value is None else _STR(value)


@dataclass
class _Sent:
    text: int = 0
    tokens: int = 0
    finished: bool = False


def _new_part(
    c: CompletionOutput, sent: _Sent, hold: int
) -> tuple[str, list[int], list[dict[int, float]]]:
    """What choice `c` adds past `sent`. Until it finishes, the last `hold` characters stay
    back: they may be the start of a stop string the engine will cut from the text."""
    end = len(c.text) if c.finish_reason is not None else max(sent.text, len(c.text) - hold)
    text = c.text[sent.text : end]
    ids = c.token_ids[sent.tokens :]
    lps = c.logprobs[sent.tokens :] if c.logprobs is not None else []
    sent.text, sent.tokens = end, len(c.token_ids)
    return text, ids, lps


async def _events(
    state: ServerState,
    sub: Submitted,
    body: SamplingFields,
    chunk: Any,
    first: list[str] | None = None,
) -> AsyncIterator[str]:
    """Shared SSE loop: `chunk(choice_index, c, text, ids, lps)` makes one chunk's fields
    past id, created and model, as JSON text (`"object":...,"choices":[...]`; "" to send
    nothing yet): chunks are assembled from JSON pieces, one per streamed token, not built
    as dicts and encoded.

    Errors after the 200 header went out can only be told in-band: an `error` event, then
    [DONE].
    """
    sent: dict[int, _Sent] = {}
    hold = max((len(s) for s in body.stop_list()), default=1) - 1
    head = f'data: {{"id":{_STR(sub.request_id)},"created":{sub.created},"model":{_STR(sub.model)},'
    # Each yield is one socket write: the chunks of one engine output go out together, and
    # those of the last output together with the usage chunk and [DONE].
    events: list[str] = []
    unfinished = len(sub.streams)
    if first:  # chat's role chunks go out before the first token
        yield "".join(first)
    try:
        async for p, out in merged(state, sub):
            for c in out.outputs:
                i = p * sub.n + c.index
                s = sent.setdefault(i, _Sent())
                if s.finished:
                    continue
                text, ids, lps = _new_part(c, s, hold)
                # A token whose text is still incomplete (part of a UTF-8 character) is sent
                # with empty text, as vLLM does: clients time the first token, not the first
                # character.
                if not text and not ids and c.finish_reason is None and not lps:
                    continue
                s.finished = c.finish_reason is not None
                fields = chunk(i, c, text, ids, lps)
                if not fields:
                    continue  # held back (a tool call still being written)
                usage = _usage(sub) if sub.continuous_usage else ""
                events.append(f"{head}{fields}{usage}}}\n\n")
            unfinished -= out.finished
            if events and unfinished:
                yield "".join(events)
                events.clear()
        if sub.include_usage:
            events.append(f"{head}{chunk(None, None, '', [], [])}{_usage(sub)}}}\n\n")
    except EngineDeadError as e:
        err = APIError(503, str(e), "server_error", code="engine_unavailable")
        events.append(sse({"error": err.info.model_dump()}))
    except Exception as e:
        logger.exception("streaming request %s failed", sub.request_id)
        err = APIError(500, f"internal error: {type(e).__name__}", "server_error")
        events.append(sse({"error": err.info.model_dump()}))
    events.append(_DONE)
    yield "".join(events)


def _usage(sub: Submitted) -> str:
    return f',"usage":{_ENCODE(usage_of(sub).model_dump())}'


def completion_events(
    state: ServerState, sub: Submitted, body: CompletionRequest, echo_texts: list[str]
) -> AsyncIterator[str]:
    offsets: dict[int, int] = {}

    def chunk(
        i: int | None,
        c: CompletionOutput | None,
        text: str,
        ids: list[int],
        lps: list[dict[int, float]],
    ) -> str:
        if i is None or c is None:
            return '"object":"text_completion","choices":[]'
        if body.echo and i not in offsets:
            text = echo_texts[i // sub.n] + text
        logprobs = "null"
        if body.logprobs is not None and lps:
            lp = completion_logprobs(state, ids, lps, body.logprobs, offsets.get(i, 0))
            logprobs = _ENCODE(lp.model_dump())
        offsets[i] = offsets.get(i, 0) + len(text)
        return (
            f'"object":"text_completion","choices":[{{"index":{i},"text":{_STR(text)},'
            f'"logprobs":{logprobs},"finish_reason":{_json_or_null(c.finish_reason)}}}]'
        )

    return _events(state, sub, body, chunk)


def chat_events(
    state: ServerState, sub: Submitted, body: ChatCompletionRequest
) -> AsyncIterator[str]:
    k = body.engine_logprobs()
    base = {
        "id": sub.request_id,
        "object": "chat.completion.chunk",
        "created": sub.created,
        "model": sub.model,
    }
    first = [
        sse(
            {
                **base,
                "choices": [
                    {
                        "index": i,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
        for i in range(sub.n)
    ]

    mode, parser, name = _tool_setup(state, body)
    streamers: dict[int, ToolStreamer] = {}
    call_ids: dict[int, list[str]] = {}

    def chunk(
        i: int | None,
        c: CompletionOutput | None,
        text: str,
        ids: list[int],
        lps: list[dict[int, float]],
    ) -> str:
        if i is None or c is None:
            return '"object":"chat.completion.chunk","choices":[]'
        logprobs = "null"
        if k is not None and lps:
            logprobs = _ENCODE(chat_logprobs(state, ids, lps, k).model_dump())
        reason = c.finish_reason
        if mode == "none":
            delta = f'{{"content":{_STR(text)}}}' if text else "{}"
        else:
            streamer = streamers.setdefault(i, ToolStreamer(mode, parser, name))
            content, calls, args = streamer.feed(text, reason is not None)
            delta = _tool_delta(content, calls, args, call_ids.setdefault(i, []), name)
            reason = _tool_finish(reason, mode, bool(streamer.calls))
            if delta == "{}" and reason is None and logprobs == "null":
                return ""
        return (
            f'"object":"chat.completion.chunk","choices":[{{"index":{i},"delta":{delta},'
            f'"logprobs":{logprobs},"finish_reason":{_json_or_null(reason)}}}]'
        )

    return _events(state, sub, body, chunk, first)


def _tool_delta(
    content: str, calls: list[Call], args: str, ids: list[str], name: str | None
) -> str:
    """A chat chunk's delta with tool calls: complete new calls (each with its id, name and
    arguments), or the next piece of a named function's arguments (its id and name first)."""
    delta: dict[str, Any] = {"content": content} if content else {}
    entries = []
    for fn, arguments in calls:
        ids.append(ToolCall(function=FunctionCall(name=fn, arguments="")).id)
        entries.append({"index": len(ids) - 1, "id": ids[-1], "type": "function",
                        "function": {"name": fn, "arguments": arguments}})  # fmt: skip
    if args or (name is not None and not ids):
        if not ids:
            ids.append(ToolCall(function=FunctionCall(name=name or "", arguments="")).id)
            entries.append({"index": 0, "id": ids[0], "type": "function",
                            "function": {"name": name, "arguments": args}})  # fmt: skip
        else:
            entries.append({"index": 0, "function": {"arguments": args}})
    if entries:
        delta["tool_calls"] = entries
    return _ENCODE(delta)
