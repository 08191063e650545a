"""FastAPI app of the engine server: routes, error handlers, model loading and shutdown.

The HTTP server comes up before the model is loaded: /health answers 503 until the engine is
ready (and again while shutting down), so a launcher can tell "starting" from "dead".
"""

from __future__ import annotations

import asyncio
import gc
import importlib.metadata
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from engine.server.async_engine import AsyncLLMEngine, EngineDeadError, QueueFullError
from engine.server.auth import check_api_key
from engine.server.engine_process import ProcessLLMEngine
from engine.server.errors import APIError, bad_request
from engine.server.metrics import EngineStats, ServerMetrics
from engine.server.middleware import BodyLimit, CatchErrors
from engine.server.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    ParamError,
    TokenizeRequest,
    TokenizeResponse,
)
from engine.server.responses import chat_response, completion_response
from engine.server.streaming import SSEResponse, chat_events, completion_events
from engine.server.submission import (
    ClientDisconnected,
    chat_prompt,
    check_model,
    encode_prompt,
    encode_text,
    submit,
    until_disconnect,
)

if TYPE_CHECKING:
    from engine.config import EngineArgs
    from engine.llm_engine import LLMEngine

logger = logging.getLogger("engine.server")


@dataclass
class ServerConfig:
    served_model_name: str
    api_key: str | None = None
    max_pending: int = 1024  # requests waiting for a first token before 503s start
    max_request_bytes: int = 4 * 2**20  # a full 128k-token prompt as JSON fits with room
    retry_after_s: int = 1
    drain_timeout_s: float = 30.0  # graceful shutdown: let in-flight requests finish this long
    enable_auto_tool_choice: bool = False  # tool_choice "auto" (needs tool_call_parser)
    tool_call_parser: str | None = None  # llama3_json | hermes: finds calls in the output


class ServerState:
    """Everything the routes share: config, metrics, and the engine once it is loaded."""

    def __init__(
        self,
        config: ServerConfig,
        load_engine: Callable[[], LLMEngine] | None = None,
        engine_args: EngineArgs | None = None,
    ) -> None:
        if (load_engine is None) == (engine_args is None):
            raise ValueError("give exactly one of load_engine (engine thread) or engine_args")
        self.config = config
        self.load_engine = load_engine
        self.engine_args = engine_args
        self.status = "loading"  # loading | ready | draining | failed
        self.engine: AsyncLLMEngine | None = None
        self.load_error: BaseException | None = None
        self.on_load_failure: Callable[[BaseException], None] | None = None
        self.metrics = ServerMetrics(config.served_model_name, self._stats)
        self._token_text = lru_cache(maxsize=65536)(self._decode_one)

    def _stats(self) -> EngineStats:
        return self.engine.stats if self.engine is not None else EngineStats()

    async def load(self) -> None:
        cfg = self.config
        try:
            if self.engine_args is not None:
                proc = ProcessLLMEngine(self.engine_args, cfg.max_pending, cfg.retry_after_s)
                self.engine = proc
                await proc.launch()
            else:
                assert self.load_engine is not None
                llm = await asyncio.to_thread(self.load_engine)
                self.engine = AsyncLLMEngine(llm, cfg.max_pending, cfg.retry_after_s)
                self.engine.start()
            self.status = "ready"
            # What loading made lives as long as the server: out of the collector's sight, the
            # full collections that request garbage triggers do not walk it again each time.
            gc.collect()
            gc.freeze()
            logger.info("model %s loaded; serving", self.config.served_model_name)
        except Exception as e:
            logger.exception("loading the model failed")
            self.status, self.load_error = "failed", e
            if self.on_load_failure is not None:
                self.on_load_failure(e)

    async def shutdown(self) -> None:
        self.status = "draining"
        if self.engine is not None:
            await self.engine.shutdown(self.config.drain_timeout_s)

    def require_engine(self) -> AsyncLLMEngine:
        if self.status != "ready" or self.engine is None or not self.engine.is_running:
            state = "failed" if self.engine is not None and self.status == "ready" else self.status
            raise APIError(
                503,
                f"the engine is not ready (status: {state}); retry later",
                "server_error",
                code="engine_unavailable",
                headers={"Retry-After": str(self.config.retry_after_s)},
            )
        return self.engine

    @property
    def tokenizer(self) -> Any:
        return self.require_engine().tokenizer

    @property
    def max_model_len(self) -> int:
        return self.require_engine().max_model_len

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.tokenizer, "vocab_size", None)

    def token_text(self, token_id: int) -> str:
        return self._token_text(token_id)

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


# ---- errors ---------------------------------------------------------------------------------


def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # A value that fails every member of a union errs once per member: the lone surrogate, if
    # any, is what is wrong with it.
    err = next((e for e in errors if e.get("type") == "lone_surrogate"), errors[0])
    loc = [str(x) for x in err.get("loc", ()) if x != "body" and not _union_tag(x)]
    cause = (err.get("ctx") or {}).get("error")
    if isinstance(cause, ParamError):
        return bad_request(str(cause), cause.param).response()
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad_request(f"the request body is not valid JSON: {detail}".rstrip(": ")).response()
    param = loc[0] if loc and not loc[0].isdigit() else None
    where = ".".join(loc) or "body"
    value = repr(err.get("input"))
    value = value if len(value) <= 80 else value[:77] + "..."
    msg = err.get("msg", "invalid value")
    if err.get("type") == "missing":
        return bad_request(f"{where}: this field is required", param).response()
    return bad_request(f"{where}: {msg} (got {value})", param).response()


def _union_tag(loc: object) -> bool:
    """pydantic's name of a union member in an error's location ('str', 'list[int]', ...)."""
    return isinstance(loc, str) and ("[" in loc or loc in ("str", "int", "float", "bool"))


def _api_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return exc.response()


def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    code = "request_too_large" if exc.status_code == 413 else None
    return APIError(
        exc.status_code, str(exc.detail), kind, code=code, headers=exc.headers
    ).response()


def _engine_errors(e: Exception) -> APIError:
    """Map the engine front's exceptions to HTTP errors."""
    if isinstance(e, QueueFullError):
        return APIError(
            503,
            str(e),
            "server_error",
            code="server_overloaded",
            headers={"Retry-After": str(e.retry_after_s)},
        )
    if isinstance(e, EngineDeadError):
        return APIError(503, str(e), "server_error", code="engine_unavailable")
    if isinstance(e, ValueError):  # the engine's own validation (names the parameter)
        head = str(e).split(" ", 1)[0]
        return bad_request(str(e), head if head.isidentifier() else None)
    raise e


# ---- routes ---------------------------------------------------------------------------------


def engine_version() -> str:
    """The installed distribution's version (the engine ships in skybroker's)."""
    try:
        return importlib.metadata.version("skybroker")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    what = {
        400: "Invalid request: the message and `param` name the field and what is allowed",
        401: "Missing or wrong API key",
        404: "No such model on this server (`model` names another)",
        413: "Request body over the server's --max-request-bytes",
        503: "Engine not ready, or overloaded (see Retry-After)",
    }
    return {c: {"model": ErrorResponse, "description": what[c]} for c in codes}


router = APIRouter()
api = APIRouter(dependencies=[Depends(check_api_key)], responses=_errors(400, 401, 404, 413, 503))
# With "stream": true: server-sent events, each `data:` a JSON chunk, the last `[DONE]`.
_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {"type": "string"}}}
_STREAM = {"text/event-stream": {"schema": _EVENT}}
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}


def _state(request: Request) -> ServerState:
    return request.app.state.server


@router.get("/health", responses={503: {"description": "Loading, draining or failed"}})
async def health(request: Request) -> JSONResponse:
    state = _state(request)
    ready = state.status == "ready" and state.engine is not None and state.engine.is_running
    status = state.status if state.status != "ready" or ready else "failed"
    return JSONResponse({"status": status}, 200 if ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    dependencies=[Depends(check_api_key)],  # load and queue figures are the key holder's
    # The 401 is JSON, as on every route; the 200 is Prometheus text.
    responses={401: {"description": "Missing or wrong API key", "content": _ERROR_JSON}},
)
async def metrics(request: Request) -> Response:
    body = _state(request).metrics.render()
    return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


@api.get("/v1/models")
async def models(request: Request) -> ModelList:
    state = _state(request)
    state.require_engine()
    name = state.config.served_model_name
    card = ModelCard(id=name, root=name, max_model_len=state.max_model_len)
    return ModelList(data=[card])


@api.get("/v1/models/{model_id:path}")
async def model(model_id: str, request: Request) -> ModelCard:
    state = _state(request)
    state.require_engine()
    check_model(state, model_id)
    return ModelCard(id=model_id, root=model_id, max_model_len=state.max_model_len)


@router.get("/version")
async def version() -> dict[str, str]:
    return {"version": engine_version()}


@api.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    state.require_engine()
    check_model(state, body.model)
    if body.messages is not None:
        text = chat_prompt(state, body, body.message_dicts())
        ids = await encode_text(state, text, bool(body.add_special_tokens))
    else:
        special = body.add_special_tokens is not False
        ids = await encode_text(state, body.prompt or "", special)
    strs = None
    if body.return_token_strs:  # the vocabulary's own strings (vLLM: convert_ids_to_tokens)
        strs = [state.tokenizer.tokenizer.id_to_token(t) or "" for t in ids]
    return TokenizeResponse(
        count=len(ids), max_model_len=state.max_model_len, tokens=ids, token_strs=strs
    )


@api.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    state.require_engine()
    check_model(state, body.model)
    vocab = state.vocab_size
    if vocab is not None and any(t >= vocab for t in body.tokens):
        raise bad_request(f"tokens: token ids must be < vocabulary size {vocab}", "tokens")
    return DetokenizeResponse(prompt=state.tokenizer.decode(body.tokens))


@api.post(
    "/v1/completions",
    response_model=None,
    responses={200: {"model": CompletionResponse, "content": _STREAM}},
)
async def completions(body: CompletionRequest, request: Request) -> Any:
    state = _state(request)
    state.require_engine()
    check_model(state, body.model)
    raw = body.prompts()
    special = body.add_special_tokens
    prompts = [await encode_prompt(state, p, "prompt", special) for p in raw]
    echo = (
        [p if isinstance(p, str) else state.tokenizer.decode(p) for p in raw] if body.echo else []
    )
    try:
        sub = await submit(state, body, "cmpl", prompts, body.max_tokens, body.engine_logprobs())
    except (QueueFullError, EngineDeadError, ValueError) as e:
        _reject(state, e)
        raise _engine_errors(e) from e
    if body.stream:
        return SSEResponse(completion_events(state, sub, body, echo))
    return await _respond(request, completion_response(state, sub, body, echo))


@api.post(
    "/v1/chat/completions",
    response_model=None,
    responses={200: {"model": ChatCompletionResponse, "content": _STREAM}},
)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    state = _state(request)
    state.require_engine()
    check_model(state, body.model)
    cfg = state.config
    if body.tool_mode() == "auto" and not (cfg.enable_auto_tool_choice and cfg.tool_call_parser):
        raise bad_request(
            'tool_choice: "auto" needs the server started with --enable-auto-tool-choice and '
            '--tool-call-parser; use "none", "required" or a named function',
            "tool_choice",
        )
    text = chat_prompt(state, body, body.message_dicts())
    ids = await encode_prompt(state, text, "messages", body.add_special_tokens)
    try:
        sub = await submit(
            state, body, "chatcmpl", [ids], body.requested_max_tokens(), body.engine_logprobs()
        )
    except (QueueFullError, EngineDeadError, ValueError) as e:
        _reject(state, e)
        raise _engine_errors(e) from e
    if body.stream:
        return SSEResponse(chat_events(state, sub, body))
    return await _respond(request, chat_response(state, sub, body))


def _reject(state: ServerState, e: Exception) -> None:
    if isinstance(e, QueueFullError):
        state.metrics.observe_rejected()


async def _respond(request: Request, work: Any) -> Any:
    try:
        return await until_disconnect(request, work)
    except ClientDisconnected:
        # Nobody reads this; 499 is nginx's "client closed request".
        return Response(status_code=499)
    except EngineDeadError as e:
        raise _engine_errors(e) from e


# ---- app ------------------------------------------------------------------------------------


def create_app(
    config: ServerConfig,
    load_engine: Callable[[], LLMEngine] | None = None,
    *,
    engine_args: EngineArgs | None = None,
) -> FastAPI:
    """The server app. Either `load_engine` builds an LLMEngine (at startup, in a thread) that
    steps on a thread of this process, or the engine built from `engine_args` runs in a child
    process (what `python -m engine.serve` does: the HTTP work then never slows the engine)."""
    state = ServerState(config, load_engine, engine_args)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loading = asyncio.create_task(state.load())
        yield
        if not loading.done():
            loading.cancel()
        await state.shutdown()

    app = FastAPI(title="skybroker engine server", lifespan=lifespan)
    app.state.server = state
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(APIError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(BodyLimit, limit=config.max_request_bytes)
    app.add_middleware(CatchErrors)  # outermost of ours: it sees what BodyLimit raises too
    app.include_router(router)
    app.include_router(api)
    return app
