"""What a request asks for (``StructuredSpec``) and its node tree; the tool-call form.

Kinds: ``json_schema`` (value: the schema), ``json_object`` (any JSON object; value ignored),
``regex`` (value: a pattern, full match), ``choice`` (value: a list of strings, one of them
verbatim) and ``sequence`` (value: a list of parts, each ``{"text": str}`` or
``{"json_schema": schema}``, matched one after the other). ``tool_call_spec`` builds the
sequence ``<tool_call>{"name": one of N, "arguments": <that tool's parameters>}</tool_call>``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from model.structured.errors import SpecError
from model.structured.json_schema import SchemaCompiler
from model.structured.json_values import any_object
from model.structured.nodes import Node, alt, literal, seq
from model.structured.regex import regex_node

KINDS = ("json_schema", "json_object", "regex", "choice", "sequence")
JSON_OBJECT_DEPTH = 4


@dataclass(frozen=True)
class StructuredSpec:
    """One constraint on a completion's text. ``value`` is JSON data (schema, pattern, list)."""

    kind: str
    value: Any = None
    max_recursion: int = 3
    any_depth: int = 2

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SpecError(f"unknown structured-output kind {self.kind!r}", "type")

    def cache_key(self) -> str:
        """Canonical JSON of the spec. Key order is kept (property order is meaningful), so
        two schemas differing only in key order are two entries: at worst a cache miss."""
        data = [self.kind, self.value, self.max_recursion, self.any_depth]
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False, default=repr)

    def node(self) -> Node:
        """The node tree the automaton is built from. Raises SpecError."""
        if self.kind == "json_object":
            return any_object(JSON_OBJECT_DEPTH)
        if self.kind == "json_schema":
            return SchemaCompiler(self.value, self.max_recursion, self.any_depth).value(self.value)
        if self.kind == "regex":
            if not isinstance(self.value, str):
                raise SpecError("regex: must be a string", "regex")
            return regex_node(self.value, is_json=False, is_search=False, keyword="regex")
        if self.kind == "choice":
            if (
                not isinstance(self.value, list)
                or not self.value
                or not all(isinstance(c, str) for c in self.value)
            ):
                raise SpecError("choice: must be a non-empty list of strings", "choice")
            return alt(*(literal(c) for c in self.value))
        parts = []
        for part in self.value:
            if isinstance(part, dict) and set(part) == {"text"} and isinstance(part["text"], str):
                parts.append(literal(part["text"]))
            elif isinstance(part, dict) and set(part) == {"json_schema"}:
                schema = part["json_schema"]
                parts.append(
                    SchemaCompiler(schema, self.max_recursion, self.any_depth).value(schema)
                )
            else:
                raise SpecError(f"sequence: bad part {part!r}", "sequence")
        return seq(*parts)


def tool_call_schema(tools: list[dict]) -> dict:
    """The anyOf of ``{"name": const, "arguments": parameters}`` objects, one per tool.
    ``tools`` are OpenAI tool dicts (``{"type": "function", "function": {...}}``) or bare
    function dicts (``name``, ``parameters``)."""
    branches = []
    for tool in tools:
        function = tool.get("function", tool)
        name = function.get("name")
        if not isinstance(name, str):
            raise SpecError(f"tools: a tool without a name: {tool!r}", "tools")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        branches.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": parameters},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    if not branches:
        raise SpecError("tools: empty", "tools")
    return {"anyOf": branches}


def tool_call_spec(
    tools: list[dict], begin: str = "<tool_call>", end: str = "</tool_call>"
) -> StructuredSpec:
    """``begin`` + one call of one of ``tools`` as JSON + ``end`` (the Hermes/Qwen form; pass
    ``begin="<tool_call>\\n"`` etc. to match a template's newlines). The literals are matched
    as text bytes: a tokenizer that has ``<tool_call>`` as a special token must add it itself."""
    parts = [{"text": begin}, {"json_schema": tool_call_schema(tools)}, {"text": end}]
    return StructuredSpec("sequence", parts)
