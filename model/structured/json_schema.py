"""JSON Schema -> node tree (compact JSON, properties in schema order).

Supported: ``type`` (one or a list), ``enum``, ``const``, ``anyOf``/``oneOf`` (oneOf is
generated like anyOf: give it disjoint branches), ``allOf`` (merged), local ``$ref`` into
``$defs``/``definitions``/any JSON pointer (recursion unrolled ``max_recursion`` deep, then the
recursive branch is cut), objects (``properties``, ``required``, ``additionalProperties``),
arrays (``items``, ``prefixItems``, ``minItems``, ``maxItems``), strings (``minLength``,
``maxLength``, ``pattern``, ``format`` in json_values.FORMATS) and numeric ranges. An object
without ``additionalProperties`` gets no extra members unless it declares no properties at
all. Annotations are ignored; any other keyword raises UnsupportedKeywordError naming it.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

from model.structured.errors import SpecError, UnsupportedKeywordError
from model.structured.json_values import COLON, any_json, json_literal, string_except, string_node
from model.structured.nodes import (
    COMMA,
    EMPTY,
    NEVER,
    Members,
    Node,
    Repeat,
    SepRepeat,
    alt,
    literal,
    seq,
)
from model.structured.numbers import decimal_node, integer_node

ANNOTATIONS = frozenset(
    [
        "title",
        "description",
        "examples",
        "example",
        "default",
        "$schema",
        "$id",
        "$comment",
        "$anchor",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
        "contentMediaType",
        "contentEncoding",
    ]
)
_TYPE_KEYWORDS = {
    "string": {"minLength", "maxLength", "pattern", "format"},
    "number": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems", "additionalItems", "uniqueItems"},
}
_TYPE_KEYWORDS["integer"] = _TYPE_KEYWORDS["number"]
_STRUCTURAL = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions"}
SUPPORTED = frozenset(set().union(*_TYPE_KEYWORDS.values()) | _STRUCTURAL)
_TYPES = ("string", "number", "integer", "boolean", "null", "object", "array")


class SchemaCompiler:
    """Compiles one schema; ``max_recursion``: how often one $ref may nest inside itself,
    ``any_depth``: container depth of values the schema leaves free (``{}``, ``true``)."""

    def __init__(self, root: Any, max_recursion: int = 3, any_depth: int = 2) -> None:
        self.root = root
        self.max_recursion = max_recursion
        self.any_depth = any_depth
        self._ref_depth: dict[str, int] = {}

    def value(self, schema: Any) -> Node:
        """The node for one JSON value under ``schema``."""
        if schema is True or schema == {}:
            return any_json(self.any_depth)
        if schema is False:
            return NEVER
        if not isinstance(schema, dict):
            raise SpecError(f"a schema must be an object or a boolean, not {schema!r}")
        for key in schema:
            if key not in SUPPORTED and key not in ANNOTATIONS and not key.startswith("x-"):
                raise UnsupportedKeywordError(key)
        if "$ref" in schema:
            return self._ref(schema)
        if "allOf" in schema:
            return self.value(self.merge([*schema["allOf"], _without(schema, "allOf")]))
        if "anyOf" in schema or "oneOf" in schema:
            return self._any_of(schema)
        if "enum" in schema or "const" in schema:
            return self._literals(schema)
        types = schema.get("type")
        types = [types] if isinstance(types, str) else types
        if types is None:  # no type: the types whose keywords appear, else anything
            types = [
                t
                for t in ("string", "number", "object", "array")
                if set(schema) & _TYPE_KEYWORDS[t]
            ]
            if not types:
                return any_json(self.any_depth)
        if not isinstance(types, list) or any(t not in _TYPES for t in types):
            raise SpecError(f"type: {types!r} is not a JSON Schema type", "type")
        return alt(*(self._typed(t, schema) for t in dict.fromkeys(types)))

    def _typed(self, kind: str, schema: dict) -> Node:
        if kind == "string":
            return string_node(
                _count(schema, "minLength", 0),
                _count(schema, "maxLength", None),
                schema.get("pattern"),
                schema.get("format"),
            )
        if kind in ("number", "integer"):
            return _number(schema, kind == "integer")
        if kind == "boolean":
            return alt(literal("true"), literal("false"))
        if kind == "null":
            return literal("null")
        if kind == "object":
            return self._object(schema)
        return self._array(schema)

    def _ref(self, schema: dict) -> Node:
        ref = schema["$ref"]
        rest = {k: v for k, v in _without(schema, "$ref").items() if k not in ANNOTATIONS}
        rest.pop("$defs", None)
        rest.pop("definitions", None)
        depth = self._ref_depth.get(ref, 0)
        if depth > self.max_recursion:
            return NEVER  # cut the recursion here; the branches around it must end it
        self._ref_depth[ref] = depth + 1
        try:
            target = self.resolve(ref)
            return self.value(self.merge([target, rest]) if rest else target)
        finally:
            self._ref_depth[ref] = depth

    def resolve(self, ref: Any) -> Any:
        """The subschema a local ``$ref`` (``#`` or ``#/json/pointer``) points at."""
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedKeywordError("$ref", f"only local references, not {ref!r}")
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(target, dict) and part in target:
                target = target[part]
            elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                target = target[int(part)]
            else:
                raise SpecError(f"$ref: {ref!r} points at nothing", "$ref")
        return target

    def merge(self, schemas: list[Any]) -> Any:
        """One schema equal to the conjunction of ``schemas`` (allOf), where it can be built
        by merging keywords; raises UnsupportedKeywordError("allOf") where it cannot."""
        merged: dict[str, Any] = {}
        owners_of_props: list[dict] = []
        for schema in schemas:
            if schema is True:
                continue
            if schema is False:
                return False
            if not isinstance(schema, dict):
                raise SpecError(f"allOf: {schema!r} is not a schema", "allOf")
            if "$ref" in schema:
                schema = self.merge([self.resolve(schema["$ref"]), _without(schema, "$ref")])
            if "allOf" in schema:
                schema = self.merge([*schema["allOf"], _without(schema, "allOf")])
            if "properties" in schema or "additionalProperties" in schema:
                owners_of_props.append(schema)
            for key, val in schema.items():
                if key in ANNOTATIONS or key in ("$defs", "definitions"):
                    continue
                if key not in merged or merged[key] == val:
                    merged[key] = val
                elif key == "properties":
                    props = dict(merged[key])
                    for name, sub in val.items():
                        props[name] = {"allOf": [props[name], sub]} if name in props else sub
                    merged[key] = props
                elif key == "required":
                    merged[key] = list(dict.fromkeys([*merged[key], *val]))
                elif key == "type":
                    merged[key] = _type_intersection(merged[key], val)
                elif key in ("minLength", "minItems", "minimum", "exclusiveMinimum"):
                    merged[key] = max(merged[key], val)
                elif key in ("maxLength", "maxItems", "maximum", "exclusiveMaximum"):
                    merged[key] = min(merged[key], val)
                else:
                    raise UnsupportedKeywordError("allOf", f"branches disagree on {key!r}")
        # additionalProperties only sees its own schema's properties: merging is only exact
        # when no closed branch is joined by properties from another.
        for owner in owners_of_props:
            if owner.get("additionalProperties", True) is not True and len(owners_of_props) > 1:
                raise UnsupportedKeywordError("allOf", "additionalProperties across branches")
        return merged

    def _any_of(self, schema: dict) -> Node:
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedKeywordError("oneOf", "together with anyOf")
        key = "anyOf" if "anyOf" in schema else "oneOf"
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise SpecError(f"{key}: must be a non-empty list", key)
        rest = {k: v for k, v in _without(schema, key).items() if k not in ANNOTATIONS}
        rest.pop("$defs", None)
        rest.pop("definitions", None)
        return alt(*(self.value(self.merge([rest, b]) if rest else b) for b in branches))

    def _literals(self, schema: dict) -> Node:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        if not isinstance(values, list):
            raise SpecError("enum: must be a list", "enum")
        for key in schema:
            if key not in ANNOTATIONS and key not in (
                "enum",
                "const",
                "type",
                "$defs",
                "definitions",
            ):
                raise UnsupportedKeywordError(key, "next to enum/const")
        if "const" in schema and "enum" in schema:
            values = [v for v in values if _same(v, schema["enum"])]
        types = schema.get("type")
        if types is not None:
            types = [types] if isinstance(types, str) else types
            values = [
                v
                for v in values
                if _json_type(v) in types or (_json_type(v) == "integer" and "number" in types)
            ]
        return alt(*(json_literal(v) for v in values))

    def _object(self, schema: dict) -> Node:
        props = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(props, dict) or not isinstance(required, list):
            raise SpecError("properties/required: bad value", "properties")
        members = []
        for name, sub in props.items():
            value = self.value(sub)
            if value == NEVER:
                if name in required:
                    return NEVER
                continue
            members.append((seq(json_literal(name), COLON, value), name in required))
        for name in required:
            if name not in props:  # required but undeclared: any value, after the declared
                members.append((seq(json_literal(name), COLON, any_json(self.any_depth)), True))
        additional = schema.get("additionalProperties")
        if additional is None:
            additional = not props and not required
        extra = None
        if additional is not False:
            value = any_json(self.any_depth) if additional is True else self.value(additional)
            if value != NEVER:
                names = [*props, *(r for r in required if r not in props)]
                extra = seq(string_except(names), COLON, value)
        return seq(literal("{"), Members(tuple(members), extra), literal("}"))

    def _array(self, schema: dict) -> Node:
        if schema.get("uniqueItems") is True and _count(schema, "maxItems", None) not in (0, 1):
            raise UnsupportedKeywordError("uniqueItems")
        prefix = schema.get("prefixItems", [])
        items = schema.get("items", True)
        if isinstance(items, list):  # the draft-4 tuple form
            prefix, items = items, schema.get("additionalItems", True)
        min_items, max_items = _count(schema, "minItems", 0), _count(schema, "maxItems", None)
        prefix_nodes = [self.value(p) for p in prefix]
        rest = self.value(items)
        if not prefix_nodes:
            return seq(literal("["), SepRepeat(rest, COMMA, min_items, max_items), literal("]"))
        # Position i of the prefix, preceded by a comma; built from the end.
        tail: Node
        num_rest_min = max(0, min_items - len(prefix_nodes))
        num_rest_max = None if max_items is None else max(0, max_items - len(prefix_nodes))
        if rest == NEVER or num_rest_max == 0:
            tail = EMPTY if num_rest_min == 0 else NEVER
        else:
            tail = Repeat(seq(COMMA, rest), num_rest_min, num_rest_max)
        for i in range(len(prefix_nodes) - 1, 0, -1):
            here = (
                NEVER
                if max_items is not None and i >= max_items
                else seq(COMMA, prefix_nodes[i], tail)
            )
            tail = here if i < min_items else alt(EMPTY, here)
        first = NEVER if max_items == 0 else seq(prefix_nodes[0], tail)
        content = first if min_items > 0 else alt(EMPTY, first)
        return seq(literal("["), content, literal("]"))


def _without(schema: dict, key: str) -> dict:
    return {k: v for k, v in schema.items() if k != key}


def _count(schema: dict, key: str, default: int | None) -> int | None:
    value = schema.get(key, default)
    if value is not default and (
        not isinstance(value, int) or isinstance(value, bool) or value < 0
    ):
        raise SpecError(f"{key}: must be a non-negative integer", key)
    return value


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int) or isinstance(value, float) and value.is_integer():
        return "integer"
    return {float: "number", str: "string", list: "array", dict: "object"}[type(value)]


def _same(value: Any, values: list[Any]) -> bool:
    return any(value == v and _json_type(value) == _json_type(v) for v in values)


def _type_intersection(a: Any, b: Any) -> list[str]:
    a = {a} if isinstance(a, str) else set(a)
    b = {b} if isinstance(b, str) else set(b)
    both = a & b
    if "integer" in a | b and "number" in a | b:
        both |= {"integer"} & (a | b)
    return sorted(both)


def _decimal(value: Any, key: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SpecError(f"{key}: must be a finite number", key)
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _number(schema: dict, is_integer: bool) -> Node:
    low = high = None
    is_low_strict = is_high_strict = False
    if "minimum" in schema:
        low = _decimal(schema["minimum"], "minimum")
    if "maximum" in schema:
        high = _decimal(schema["maximum"], "maximum")
    for key, is_low in (("exclusiveMinimum", True), ("exclusiveMaximum", False)):
        if key not in schema:
            continue
        bound = schema[key]
        if isinstance(bound, bool):  # draft 4: a flag on minimum/maximum
            if is_low:
                is_low_strict = bound and low is not None
            else:
                is_high_strict = bound and high is not None
            continue
        bound = _decimal(bound, key)
        if is_low and (low is None or bound >= low):
            low, is_low_strict = bound, True
        elif not is_low and (high is None or bound <= high):
            high, is_high_strict = bound, True
    if not is_integer:
        return decimal_node(low, is_low_strict, high, is_high_strict)
    int_low = None if low is None else math.floor(low) + 1 if is_low_strict else math.ceil(low)
    int_high = None if high is None else math.ceil(high) - 1 if is_high_strict else math.floor(high)
    return integer_node(int_low, int_high)
