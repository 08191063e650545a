"""ASGI middleware of the broker's servers (the REST API): a 500 that keeps the connection.

Starlette answers an unhandled exception through the app's 500 handler and then re-raises it
to the server; uvicorn, seeing the app raise after the response started, closes the socket,
so the client's next request on that keep-alive connection is reset. Here the 500 is answered
and the exception ends with it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("skybroker.api")


class CatchErrors:
    """Answer an exception no handler took with `error_response(exc)` and log it once."""

    def __init__(self, app: ASGIApp, error_response: Callable[[Exception], Response]) -> None:
        self.app = app
        self.error_response = error_response

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
            log.error("unhandled error in %s %s", scope["method"], scope["path"], exc_info=e)
            if started:  # the status line is out: only closing the connection can tell
                raise
            await self.error_response(e)(scope, receive, send)
