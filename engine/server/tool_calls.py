"""Tool calls in chat completions: the schemas that force a call, and finding calls in text.

`tool_choice: "required"` constrains the output to a JSON array of `{"name", "parameters"}`
objects, one of the tools each; a named function constrains it to that function's parameters
(vLLM's way: the call always parses). With `"auto"` the model writes calls in its own format,
which a parser named by `--tool-call-parser` finds: `llama3_json` (Llama 3.x: a JSON object
`{"name", "parameters"}`, several separated by `;`, optionally after `<|python_tag|>`) or
`hermes` (Hermes, Qwen 2.5/3: `<tool_call>{"name", "arguments"}</tool_call>` blocks).
`ToolStreamer` turns a choice's streamed text into content deltas and complete calls.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

TOOL_PARSERS = ("llama3_json", "hermes")
Call = tuple[str, str]  # (function name, arguments as JSON text)

_HERMES_START, _HERMES_END = "<tool_call>", "</tool_call>"
_HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.S)
_PYTHON_TAG = "<|python_tag|>"


def tool_parameters(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """A function's parameters schema (no parameters: an empty object)."""
    return parameters or {"type": "object", "properties": {}}


def required_schema(tools: list[tuple[str, dict[str, Any] | None]], parallel: bool) -> dict:
    """JSON array of calls, each one of `tools` (name, parameters schema)."""
    item = {
        "type": "object",
        "anyOf": [
            {
                "properties": {
                    "name": {"type": "string", "enum": [name]},
                    "parameters": tool_parameters(params),
                },
                "required": ["name", "parameters"],
            }
            for name, params in tools
        ],
    }
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": item}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def _call(obj: Any, args_key: str) -> Call | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    return obj["name"], args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)


def parse_required(text: str) -> list[Call]:
    """The calls of a `tool_choice: "required"` output (empty if it does not parse)."""
    try:
        items = json.loads(text)
    except ValueError:
        return []
    calls = [_call(c, "parameters") for c in items] if isinstance(items, list) else []
    return [c for c in calls if c is not None]


def parse_hermes(text: str) -> tuple[str | None, list[Call]]:
    """(content before the calls, calls) of text with `<tool_call>` blocks."""
    if _HERMES_START not in text:
        return text, []
    calls = []
    for m in _HERMES_BLOCK.finditer(text):
        try:
            call = _call(json.loads(m.group(1).strip()), "arguments")
        except ValueError:
            call = None
        if call is None:
            return text, []  # not a well-formed call: the text is content
        calls.append(call)
    content = text[: text.index(_HERMES_START)]
    return content if content.strip() else None, calls


def parse_llama3_json(text: str) -> tuple[str | None, list[Call]]:
    """(None, calls) when the text is Llama 3's JSON calls; (text, []) otherwise."""
    body = text.strip().removeprefix(_PYTHON_TAG).strip()
    if not body.startswith("{"):
        return text, []
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return None, calls


PARSE = {"llama3_json": parse_llama3_json, "hermes": parse_hermes}


def parse(
    mode: str, parser: str | None, text: str, name: str | None
) -> tuple[str | None, list[Call]]:
    """(content, calls) of a whole output under a tool mode (none | auto | required | named)."""
    if mode == "named":
        return None, [(name or "", text)]
    if mode == "required":
        calls = parse_required(text)
        return (None, calls) if calls else (text, [])
    if mode == "auto" and parser is not None:
        return PARSE[parser](text)
    return text, []


@dataclass
class ToolStreamer:
    """One choice's stream: text deltas in, (content delta, new calls) out.

    named: the text is the arguments, streamed as they come (`arguments_delta`); required
    and llama3_json: the calls are parsed when the output ends (llama3_json streams content
    at once when the text does not start as a call); hermes: content until `<tool_call>`,
    then each call once its block closes.
    """

    mode: str
    parser: str | None
    name: str | None = None
    _buf: str = ""
    _sent_calls: int = 0
    _state: str = "start"  # start | content | calls
    calls: list[Call] = field(default_factory=list)

    def feed(self, text: str, final: bool) -> tuple[str, list[Call], str]:
        """(content delta, new complete calls, arguments delta of a named call)."""
        if self.mode == "named":
            if not self.calls:
                self.calls.append((self.name or "", ""))
            return "", [], text
        if self.mode == "required" or (self.mode == "auto" and self.parser == "llama3_json"):
            return self._whole(text, final)
        if self.mode == "auto" and self.parser == "hermes":
            return self._hermes(text, final)
        return text, [], ""

    def _whole(self, text: str, final: bool) -> tuple[str, list[Call], str]:
        self._buf += text
        if self._state == "start":
            head = self._buf.lstrip()
            if self.mode == "required" or head.startswith(("{", _PYTHON_TAG)):
                self._state = "calls"
            elif (not head or _PYTHON_TAG.startswith(head)) and not final:
                return "", [], ""  # too early to tell
            else:
                self._state = "content"
        if self._state == "content":
            out, self._buf = self._buf, ""
            return out, [], ""
        if not final:
            return "", [], ""
        content, calls = parse(self.mode, self.parser, self._buf, None)
        self.calls = calls
        return content or "", calls, ""

    def _hermes(self, text: str, final: bool) -> tuple[str, list[Call], str]:
        self._buf += text
        content = ""
        if self._state != "calls":
            i = self._buf.find(_HERMES_START)
            if i >= 0:
                content, self._buf, self._state = self._buf[:i], self._buf[i:], "calls"
            else:
                keep = 0 if final else _partial_suffix(self._buf, _HERMES_START)
                content, self._buf = (
                    self._buf[: len(self._buf) - keep],
                    self._buf[len(self._buf) - keep :],
                )
                return content, [], ""
        new: list[Call] = []
        while True:
            end = self._buf.find(_HERMES_END)
            if end < 0:
                break
            block, self._buf = (
                self._buf[: end + len(_HERMES_END)],
                self._buf[end + len(_HERMES_END) :],
            )
            _, calls = parse_hermes(block.strip())
            if calls:
                new += calls
            else:
                content += block  # not a call after all: nothing is lost
        if final and self._buf.strip():
            _, calls = parse_hermes(self._buf.strip()) if _HERMES_START in self._buf else (None, [])
            if calls:
                new += calls
            else:
                content += self._buf
            self._buf = ""
        self.calls += new
        return content, new, ""


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that starts `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0
