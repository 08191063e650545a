"""The broker API's one error shape and its bearer-token check.

Every error is `{"error": {"code", "message", "field", "errors": [...]}}`, where `field` names
the request field at fault (e.g. `slo.ttft_ms`, `max_price`) when there is one: ApiError is
answered with it, and so are FastAPI's validation errors, Starlette's HTTP errors and (from
skybroker.asgi) anything unhandled.
"""

import hmac
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from skybroker.asgi import CatchErrors


class FieldError(BaseModel):
    field: str | None = Field(description="dotted path of the field at fault, if any")
    message: str


class ErrorBody(BaseModel):
    code: str = Field(description="machine-readable kind, e.g. invalid_spec, not_found")
    message: str = Field(description="what went wrong, for a person")
    field: str | None = Field(default=None, description="the (first) field at fault")
    errors: list[FieldError] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    error: ErrorBody


class ApiError(Exception):
    """An error answered with the shared JSON shape."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        errors: list[FieldError] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.errors = errors or ([FieldError(field=field, message=message)] if field else [])

    def response(self) -> JSONResponse:
        body = ErrorBody(code=self.code, message=self.message, field=self.field, errors=self.errors)
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(
            ErrorResponse(error=body).model_dump(), status_code=self.status, headers=headers
        )


def _loc_field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """("body", "slo", "ttft_ms") -> "slo.ttft_ms"; ("query", "spot") -> "spot"."""
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def validation_errors(errors: list[dict[str, Any]]) -> list[FieldError]:
    out = []
    for e in errors:
        msg = str(e.get("msg", "invalid value")).removeprefix("Value error, ")
        if e.get("type") == "extra_forbidden":
            msg = "unknown field (check its spelling)"
        out.append(FieldError(field=_loc_field(e.get("loc", ())), message=msg))
    return out


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Bad request"),
        (401, "Missing or wrong API token"),
        (422, "Invalid input; `error.field` names the field"),
    ]
}


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = validation_errors(list(exc.errors()))
        first = errors[0] if errors else FieldError(field=None, message="invalid request")
        where = f"{first.field}: " if first.field else ""
        return ApiError(
            422, "invalid_request", f"{where}{first.message}", first.field, errors
        ).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        codes = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}
        return ApiError(
            exc.status_code, codes.get(exc.status_code, "http_error"), str(exc.detail)
        ).response()

    # Not an `Exception` handler: Starlette re-raises after one, and uvicorn then drops the
    # keep-alive connection (skybroker.asgi).
    app.add_middleware(CatchErrors, error_response=_internal_error)


def _internal_error(exc: Exception) -> JSONResponse:
    return ApiError(500, "internal", f"internal error: {type(exc).__name__}").response()


def auth_dependency(token: str | None) -> Any:
    """A dependency wanting `Authorization: Bearer <token>` (compared in constant time); with
    no token it lets every request through."""
    bearer = HTTPBearer(auto_error=False, description="the broker's API token")
    expected = token.encode() if token else None

    async def check(
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        if expected is None:
            return
        given = creds.credentials.encode() if creds is not None else b""
        if not hmac.compare_digest(given, expected):
            raise ApiError(
                401, "unauthorized", "missing or wrong API token (Authorization: Bearer ...)"
            )

    return check
