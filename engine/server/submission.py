"""From a validated request body to engine requests and back: prompts encoded and checked,
every prompt queued (one engine request each), their outputs merged as they come, usage
counted, and a client's disconnect watched while a response is prepared.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import Request

from engine.server.async_engine import EngineDeadError, RequestStream
from engine.server.errors import APIError, bad_request
from engine.server.protocol import ChatTemplateFields, SamplingFields, UsageInfo, random_id
from engine.tokenizer import LONG_TEXT

if TYPE_CHECKING:
    from engine.llm_engine import RequestOutput
    from engine.server.app import ServerState

T = TypeVar("T")


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
