"""The shared pieces of the engine server's request and response models: the strict base
model, validated text, the parameter error, error bodies and usage."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

MAX_N = 128
MAX_LOGPROBS = 20


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class ParamError(ValueError):
    """A bad request value; `param` names the offending field for the error body."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(f"{param}: {message}")
        self.param = param


def _unicode(value: str) -> str:
    """Reject lone UTF-16 surrogates (JSON lets `"\\ud800"` through): not text a tokenizer
    or a UTF-8 response can hold."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "lone_surrogate",
            "must be valid Unicode text; it holds a lone UTF-16 surrogate {char} at index "
            "{index} (a \\ud800-\\udfff escape without its pair)",
            {"char": ascii(value[e.start]), "index": e.start},
        ) from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class OpenAIModel(BaseModel):
    # Unknown fields are ignored (OpenAI SDKs send some we do not use, e.g. `user`). Strict:
    # a value has its JSON type (0 is no boolean, "3" no integer), as the schema says.
    model_config = ConfigDict(extra="ignore", strict=True)


# ---- errors ---------------------------------------------------------------------------------


class ErrorInfo(OpenAIModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(OpenAIModel):
    error: ErrorInfo


# ---- shared ---------------------------------------------------------------------------------


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class UsageInfo(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def _unsupported(empty: dict[str, Any]) -> WithJsonSchema:
    """The schema of a field this server rejects unless it is null or `empty`."""
    return WithJsonSchema({"anyOf": [{"type": "null"}, empty]})


Probability = Annotated[float, Field(ge=0.0, le=1.0)]
Bias = Annotated[float, Field(ge=-100.0, le=100.0)]
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
