"""Keywords the compiler cannot enforce raise a typed error naming them; annotations pass."""

from __future__ import annotations

import pytest

from model.structured import SpecError, StructuredSpec, UnsupportedKeywordError, compile_automaton

from .corpus import UNSUPPORTED


@pytest.mark.parametrize(("schema", "keyword"), UNSUPPORTED)
def test_unsupported_keyword_is_named(schema, keyword):
    with pytest.raises(UnsupportedKeywordError) as info:
        compile_automaton(StructuredSpec("json_schema", schema))
    assert info.value.keyword == keyword
    assert keyword in str(info.value)
    assert info.value.param == "response_format" and isinstance(info.value, ValueError)


@pytest.mark.parametrize(
    "spec",
    [
        StructuredSpec("json_schema", {"$ref": "#/$defs/missing"}),
        StructuredSpec("json_schema", {"type": "integer", "minimum": 5, "maximum": 1}),
        StructuredSpec("json_schema", {"type": "strin"}),
        StructuredSpec("json_schema", {"type": "string", "maxLength": -1}),
        StructuredSpec("json_schema", False),
        StructuredSpec("choice", []),
        StructuredSpec("regex", 3),
    ],
)
def test_malformed_or_empty_specs_raise(spec):
    with pytest.raises(SpecError):
        compile_automaton(spec)


def test_unknown_kind_raises():
    with pytest.raises(SpecError):
        StructuredSpec("grammar", "root ::= x")


def test_recursion_without_an_exit_has_no_instance():
    schema = {
        "$defs": {
            "a": {"type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}, "required": ["a"]}
        },
        "$ref": "#/$defs/a",
    }
    with pytest.raises(SpecError, match="no instance"):
        compile_automaton(StructuredSpec("json_schema", schema))


def test_annotations_and_extensions_are_ignored():
    schema = {
        "title": "t",
        "description": "d",
        "examples": [1],
        "default": 1,
        "$comment": "c",
        "x-order": 3,
        "deprecated": True,
        "type": "integer",
    }
    assert compile_automaton(StructuredSpec("json_schema", schema)).accepts(b"17")
