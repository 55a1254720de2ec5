"""Random walks over the default model's vocabulary: every finished text parses as JSON and
validates against its schema (jsonschema with format checks); an unfinished one is still a live
prefix."""

from __future__ import annotations

import datetime
import json
import zlib

import jsonschema
import numpy as np
import pytest

from model.structured import GrammarCompiler, StructuredSpec

from .corpus import CORPUS
from .walks import random_walk

MAX_TOKENS = 250


def validator_for(schema: dict) -> jsonschema.protocols.Validator:
    """The validator of the schema's draft (2020-12 by default), with its format checks."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_formats(value: object, schema: dict) -> None:
    """date-time and time need rfc3339-validator in jsonschema; check them with datetime."""
    fmt = schema.get("format")
    if fmt == "date-time":
        datetime.datetime.fromisoformat(value)
    elif fmt == "time":
        datetime.time.fromisoformat(value)


def check_walks(compiler: GrammarCompiler, name: str, num_walks: int) -> int:
    schema = CORPUS[name]
    grammar = compiler.compile(StructuredSpec("json_schema", schema))
    validator = validator_for(schema)
    rng = np.random.default_rng(zlib.crc32(name.encode()))  # stable across processes
    num_finished = 0
    for _ in range(num_walks):
        text, is_complete = random_walk(grammar, rng, MAX_TOKENS)
        if not is_complete:
            continue
        num_finished += 1
        value = json.loads(text.decode("utf-8"))
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (name, text, errors)
        check_formats(value, schema)
        assert grammar.automaton.accepts(text)
    return num_finished


@pytest.fixture(scope="module")
def compiler(default_vocab) -> GrammarCompiler:
    return GrammarCompiler(default_vocab)


@pytest.mark.parametrize("name", list(CORPUS))
def test_random_walks_validate(compiler, name):
    num_finished = check_walks(compiler, name, num_walks=20)
    # Free text can run past the budget; most walks must still finish.
    assert num_finished >= 5, f"{name}: only {num_finished} of 20 walks finished"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CORPUS))
def test_many_random_walks_validate(compiler, name):
    assert check_walks(compiler, name, num_walks=200) >= 50
