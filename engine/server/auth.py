"""Optional API-key check: `Authorization: Bearer <key>`, compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from engine.server.errors import APIError

# Declares the bearer scheme in the OpenAPI schema; the check itself is below (a server
# started without a key serves everyone).
_BEARER = HTTPBearer(auto_error=False, description="the server's API key, if it has one")


async def check_api_key(
    request: Request, _: HTTPAuthorizationCredentials | None = Depends(_BEARER)
) -> None:
    """FastAPI dependency: raise 401 unless the request carries the server's key (if any).

    Async although it never awaits: FastAPI runs a sync dependency on a worker thread, a
    thread hop per request."""
    key: str | None = request.app.state.server.config.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode("utf-8"), key.encode("utf-8")
    )
    if not ok:
        raise APIError(
            401,
            "invalid or missing API key: send the header 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
