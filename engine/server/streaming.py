"""Streamed completions and chat completions: OpenAI's SSE chunks, assembled from JSON pieces.

Engine outputs are cumulative (text and token ids so far), so stream deltas are the suffix past
what was already sent for each choice. Choice index = prompt index * n + sample index.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.server.async_engine import EngineDeadError
from engine.server.errors import APIError
from engine.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    FunctionCall,
    SamplingFields,
    ToolCall,
)
from engine.server.responses import chat_logprobs, completion_logprobs, tool_finish, tool_setup
from engine.server.submission import Submitted, merged, usage_of
from engine.server.tool_calls import Call, ToolStreamer

if TYPE_CHECKING:
    from engine.llm_engine import CompletionOutput
    from engine.server.app import ServerState

logger = logging.getLogger("engine.server")


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

    mode, parser, name = tool_setup(state, body)
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
            reason = tool_finish(reason, mode, bool(streamer.calls))
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
