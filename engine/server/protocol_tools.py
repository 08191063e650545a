"""Request models of structured output (OpenAI's `response_format`, vLLM's
`structured_outputs` and `guided_*`) and of tool calls (tools, tool_choice, calls)."""

from __future__ import annotations

import json
import uuid
from typing import Annotated, Any, Literal

from pydantic import Field

from engine.server.protocol_base import OpenAIModel, ParamError, Text
from engine.structured_output import StructuredOutputsParams


class JSONSchemaFormat(OpenAIModel):
    name: Text = "response"
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(OpenAIModel):
    """OpenAI's `response_format`: text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


STRUCTURED_OUTPUTS_KEYS = frozenset(
    {"json", "regex", "choice", "grammar", "json_object", "disable_any_whitespace"}
)


def structured_params(body: Any) -> StructuredOutputsParams | None:
    """The grammar the request asks for (at most one way of asking), checked now."""
    given: dict[str, dict[str, Any]] = {}
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        given["response_format"] = {"json_object": True}
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ParamError("response_format", "type json_schema needs json_schema.schema")
        given["response_format"] = {"json": rf.json_schema.schema_}
    if body.structured_outputs is not None:
        unknown = set(body.structured_outputs) - STRUCTURED_OUTPUTS_KEYS
        if unknown:
            raise ParamError(
                "structured_outputs",
                f"{sorted(unknown)} not supported; allowed: {sorted(STRUCTURED_OUTPUTS_KEYS)}",
            )
        given["structured_outputs"] = dict(body.structured_outputs)
    for name, key in (("guided_json", "json"), ("guided_regex", "regex"),
                      ("guided_choice", "choice"), ("guided_grammar", "grammar")):  # fmt: skip
        value = getattr(body, name)
        if value is not None:
            given[name] = {key: value}
    if len(given) > 1:
        raise ParamError(sorted(given)[1], f"give only one of {sorted(given)}")
    if not given:
        return None
    ((name, spec),) = given.items()
    try:
        return StructuredOutputsParams(**spec)
    except (ValueError, TypeError) as e:
        message = str(e).removeprefix("structured_outputs: ")
        raise ParamError(name, message) from None


class FunctionCall(OpenAIModel):
    name: Text
    arguments: Text  # JSON text, as OpenAI sends it


class ToolCall(OpenAIModel):
    id: Text = Field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(OpenAIModel):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(OpenAIModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(OpenAIModel):
    name: Text


class NamedToolChoice(OpenAIModel):
    type: Literal["function"]
    function: NamedFunction


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text
