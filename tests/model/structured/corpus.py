"""Schemas the structured-output tests, the benchmark and end-to-end tests share.

``CORPUS`` maps a name to a JSON Schema the compiler supports (hand-written ones and
pydantic's output); ``UNSUPPORTED`` maps a schema to the keyword its error must name.
"""

from __future__ import annotations

import datetime
import enum
import uuid
from typing import Literal

from pydantic import BaseModel, Field


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Address(BaseModel):
    street: str = Field(max_length=30)
    city: str = Field(max_length=20)
    zip_code: str = Field(pattern=r"^\d{5}$")


class Person(BaseModel):
    name: str = Field(max_length=24, description="full name")
    age: int = Field(ge=0, le=130)
    email: str | None = Field(default=None, max_length=40)
    favorite: Color = Color.red
    addresses: list[Address] = Field(default_factory=list, max_length=2)


class Item(BaseModel):
    sku: str = Field(pattern=r"^[A-Z]{3}-\d{4}$")
    quantity: int = Field(gt=0, lt=1000)
    price: float = Field(ge=0, le=10000)


class Order(BaseModel):
    id: uuid.UUID
    created: datetime.datetime
    items: list[Item] = Field(min_length=1, max_length=3)
    status: Literal["pending", "paid", "shipped"]
    note: str | None = Field(default=None, max_length=20)


class TreeNode(BaseModel):
    label: str = Field(max_length=8)
    children: list[TreeNode] = Field(default_factory=list, max_length=2)


class Cat(BaseModel):
    kind: Literal["cat"]
    lives: int = Field(ge=1, le=9)


class Dog(BaseModel):
    kind: Literal["dog"]
    good: bool


class Pet(BaseModel):
    pet: Cat | Dog = Field(discriminator="kind")
    born: datetime.date


class Event(BaseModel):
    title: str = Field(min_length=1, max_length=16)
    day: datetime.date
    at: datetime.time
    tags: list[Literal["work", "home", "fun"]] = Field(default_factory=list, max_length=3)
    priority: int | None = Field(default=None, ge=1, le=5)


SHORT = {"type": "string", "maxLength": 12}
CORPUS: dict[str, dict] = {
    "string": {"type": "string", "maxLength": 16},
    "string-min-max": {"type": "string", "minLength": 2, "maxLength": 5},
    "integer": {"type": "integer"},
    "integer-range": {"type": "integer", "minimum": -50, "maximum": 1234},
    "integer-exclusive": {"type": "integer", "exclusiveMinimum": 10, "exclusiveMaximum": 20},
    "number": {"type": "number"},
    "number-range": {"type": "number", "minimum": -1.5, "maximum": 2.25},
    "number-exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "boolean": {"type": "boolean"},
    "null": {"type": "null"},
    "type-list": {"type": ["integer", "null", "boolean"]},
    "enum": {"enum": ["red", "green", 3, None, True, {"a": [1]}]},
    "const": {"const": {"x": 'y\n"z"'}},
    "date": {"type": "string", "format": "date"},
    "time": {"type": "string", "format": "time"},
    "date-time": {"type": "string", "format": "date-time"},
    "uuid": {"type": "string", "format": "uuid"},
    "email": {"type": "string", "format": "email"},
    "ipv4": {"type": "string", "format": "ipv4"},
    "pattern-phone": {"type": "string", "pattern": r"^\+?[0-9]{1,3}-[0-9]{3}-[0-9]{4}$"},
    "pattern-alternation": {"type": "string", "pattern": r"^(cat|dog|bird)s?(\.[a-z]{1,3})*$"},
    "pattern-classes": {"type": "string", "pattern": r"^[^\s,]{1,4}\s[A-Fa-f\d_]{2}$"},
    "pattern-quoted": {"type": "string", "pattern": r'^["\\]{1,3}x$'},
    "object-simple": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "object-optional": {
        "type": "object",
        "properties": {
            "x": {"type": "integer", "minimum": 0, "maximum": 9},
            "y": {"type": "boolean"},
            "z": {"enum": ["p", "q"]},
            "w": {"type": "null"},
        },
        "required": ["y"],
    },
    "object-all-optional": {
        "type": "object",
        "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}, "c": {"const": 1}},
    },
    "object-additional-schema": {
        "type": "object",
        "properties": {"id": {"type": "integer"}},
        "required": ["id"],
        "additionalProperties": {"type": "boolean"},
    },
    "object-additional-true": {
        "type": "object",
        "properties": {"k": {"type": "boolean"}},
        "additionalProperties": True,
    },
    "object-free": {"type": "object"},
    "array": {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
    "array-min-max": {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 4},
    "array-prefix": {
        "type": "array",
        "prefixItems": [{"type": "string", "maxLength": 3}, {"type": "integer"}],
        "items": {"type": "boolean"},
        "maxItems": 4,
    },
    "array-prefix-closed": {
        "type": "array",
        "prefixItems": [{"type": "boolean"}, {"type": "null"}, {"const": "x"}],
        "items": False,
        "minItems": 1,
    },
    "array-nested": {
        "type": "array",
        "items": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 3},
        "maxItems": 3,
    },
    "anyOf": {"anyOf": [{"type": "integer"}, SHORT, {"type": "array", "items": {"type": "null"}}]},
    "oneOf-disjoint": {
        "oneOf": [
            {
                "type": "object",
                "properties": {"t": {"const": "a"}, "n": {"type": "integer"}},
                "required": ["t", "n"],
                "additionalProperties": False,
            },
            {
                "type": "object",
                "properties": {"t": {"const": "b"}, "s": SHORT},
                "required": ["t", "s"],
                "additionalProperties": False,
            },
        ]
    },
    "allOf-objects": {
        "allOf": [
            {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
            {"properties": {"b": SHORT}, "required": ["b"]},
        ]
    },
    "ref-defs": {
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": {"type": "integer"}, "y": {"type": "integer"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"from": {"$ref": "#/$defs/pt"}, "to": {"$ref": "#/$defs/pt"}},
        "required": ["from", "to"],
        "additionalProperties": False,
    },
    "ref-recursive-list": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 99},
                    "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["v", "next"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "annotations": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://example.com/x",
        "title": "T",
        "description": "d",
        "type": "object",
        "properties": {"q": {"type": "boolean", "title": "Q", "default": True, "examples": [True]}},
        "required": ["q"],
        "additionalProperties": False,
    },
    "unicode-enum": {"enum": ["héllo", "日本語", "emoji 😀", "tab\there"]},
    "empty-schema": {},
    "draft4-exclusive": {
        "$schema": "http://json-schema.org/draft-04/schema#",
        "type": "number",
        "minimum": 1,
        "exclusiveMinimum": True,
        "maximum": 3,
        "exclusiveMaximum": True,
    },
    "pydantic-person": Person.model_json_schema(),
    "pydantic-order": Order.model_json_schema(),
    "pydantic-tree": TreeNode.model_json_schema(),
    "pydantic-pet": Pet.model_json_schema(),
    "pydantic-event": Event.model_json_schema(),
    "pydantic-address": Address.model_json_schema(),
}

UNSUPPORTED: list[tuple[dict, str]] = [
    ({"type": "integer", "multipleOf": 3}, "multipleOf"),
    ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
    ({"type": "object", "minProperties": 1}, "minProperties"),
    ({"type": "object", "propertyNames": {"maxLength": 2}}, "propertyNames"),
    ({"not": {"type": "null"}}, "not"),
    ({"if": {}, "then": {}}, "if"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"type": "array", "contains": {"type": "integer"}}, "contains"),
    ({"type": "string", "format": "uri"}, "format"),
    ({"type": "string", "pattern": r"(a)\1"}, "pattern"),
    ({"type": "string", "pattern": r"(?=a)a"}, "pattern"),
    ({"type": "string", "pattern": r"\bword"}, "pattern"),
    ({"type": "string", "pattern": "a^b"}, "pattern"),
    ({"type": "string", "pattern": "^a+", "maxLength": 3}, "pattern"),
    ({"$ref": "https://example.com/schema.json"}, "$ref"),
    ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired"),
    ({"type": "object", "unevaluatedProperties": False}, "unevaluatedProperties"),
    ({"type": "string", "nullable": True}, "nullable"),
]
