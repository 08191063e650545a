"""ASGI middleware of the engine server: a request-body size limit, and 500s that keep the
connection.

Starlette answers an unhandled exception through the app's 500 handler and then re-raises it
to the server; uvicorn, seeing the app raise after the response started, closes the socket,
so the client's next request on that keep-alive connection is reset. Here the 500 is answered
and the exception ends with it.
"""

from __future__ import annotations

import logging

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.server.errors import APIError

logger = logging.getLogger("engine.server")


def too_large(limit: int, size: int | None = None) -> APIError:
    got = f"is {size} bytes" if size is not None else "is over the limit"
    return APIError(
        413,
        f"the request body {got}: this server accepts at most {limit} bytes "
        "(python -m engine.serve --max-request-bytes)",
        code="request_too_large",
    )


class BodyLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as soon
    as the bytes read pass it (a chunked body), before any of it is parsed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.limit:
            # uvicorn reads and drops the unread body, so the connection stays usable.
            await too_large(self.limit, declared).response()(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:  # FastAPI lets an HTTPException out of its body read
                    raise HTTPException(413, too_large(self.limit).info.message)
            return message

        await self.app(scope, limited, send)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class CatchErrors:
    """Answer an exception no handler took with an OpenAI-shaped 500 and log it once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as e:
            logger.error("unhandled error in %s %s", scope["method"], scope["path"], exc_info=e)
            if started:  # the status line is out: only closing the connection can tell
                raise
            err = APIError(500, f"internal error: {type(e).__name__}", "server_error")
            await err.response()(scope, receive, send)
