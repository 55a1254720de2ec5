"""Masks against a brute-force walk of every token; the matcher, batches, EOS, the LRU, tool
calls and the other spec kinds."""

from __future__ import annotations

import json

import numpy as np
import pytest

from model.structured import (
    DEAD,
    GrammarCompiler,
    GrammarMatcher,
    StructuredSpec,
    VocabIndex,
    compile_automaton,
    fill_masks,
    tool_call_spec,
)

from .corpus import CORPUS

# A tiny vocabulary with tokens spanning several JSON lexemes, a split UTF-8 character and a
# special token (id 0) whose text must never be allowed.
TOKENS = [
    b"<eos>",
    b"{",
    b"}",
    b'"',
    b'"a"',
    b'":',
    b"},",
    b'"}',
    b"1",
    b"12",
    b"a",
    b"ab",
    b",",
    b":",
    b"[",
    b"]",
    b"true",
    b"\xc3",
    b"\xa9",
    b"\xc3\xa9",
    b' "',
    b"null",
    b'{"a":',
    b"",
    b"\\n",
    b'\\"',
]


@pytest.fixture(scope="module")
def tiny() -> VocabIndex:
    return VocabIndex(TOKENS, special_ids=[0], vocab_size=len(TOKENS) + 3)


def brute_force(automaton, vocab: VocabIndex, state: int) -> np.ndarray:
    return np.array([bool(t) and automaton.step(state, t) != DEAD for t in vocab.token_bytes])


@pytest.mark.parametrize(
    "name", ["object-simple", "string", "enum", "array-nested", "pydantic-pet", "unicode-enum"]
)
def test_masks_equal_brute_force(tiny, default_vocab, name):
    for vocab in (tiny, default_vocab):
        grammar = GrammarCompiler(vocab).compile(StructuredSpec("json_schema", CORPUS[name]))
        rng = np.random.default_rng(0)
        state = grammar.automaton.start
        for _ in range(12):
            mask = grammar.masker.allowed(state)
            assert mask.shape == (vocab.vocab_size,) and mask.dtype == bool
            assert (mask == brute_force(grammar.automaton, vocab, state)).all()
            allowed = np.flatnonzero(mask)
            if not allowed.size:
                break
            state = grammar.masker.next_state(state, int(rng.choice(allowed)))


@pytest.mark.parametrize(
    "name", ["string", "string-min-max", "object-free", "empty-schema", "pydantic-person", "enum"]
)
def test_plain_chain_walk_equals_the_full_walk(tiny, default_vocab, name):
    """From states where plain bytes all lead to one state per depth (string text, bounded or
    not), the short walk visits only the non-plain nodes; it must give the same masks."""
    for vocab in (tiny, default_vocab):
        grammar = GrammarCompiler(vocab).compile(StructuredSpec("json_schema", CORPUS[name]))
        automaton, masker = grammar.automaton, grammar.masker
        table = automaton.flat_table.astype(np.intp)
        num_short = 0
        for state in range(1, min(automaton.num_states, 120)):
            chain = masker._plain_chain(state)
            if chain is None:
                continue
            num_short += 1
            short = masker._walk_others(chain, table)
            assert (short == masker._walk_levels(state, table)).all()
            if vocab is tiny:
                assert (short == brute_force(automaton, vocab, state)).all()
        if name != "enum":
            assert num_short, "string text has states the short walk serves"


def test_tokens_spanning_lexemes_and_split_characters(tiny):
    schema = {
        "type": "object",
        "properties": {"a": {"type": "string"}},
        "required": ["a"],
        "additionalProperties": False,
    }
    grammar = GrammarCompiler(tiny).compile(StructuredSpec("json_schema", schema))
    matcher = GrammarMatcher(grammar, eos_token_ids=[0])
    for token in [22, 3, 17, 18, 24, 7]:  # {"a": " \xc3 \xa9 \n "}
        assert matcher.accept_token(token), TOKENS[token]
    assert matcher.is_accepting() and matcher.is_terminated()
    out = np.zeros(tiny.vocab_size, dtype=bool)
    matcher.fill_mask(out)
    assert np.flatnonzero(out).tolist() == [0]  # only EOS
    assert matcher.accept_token(0) and matcher.is_done


def test_matcher_rejects_disallowed_tokens_and_early_eos(tiny):
    grammar = GrammarCompiler(tiny).compile(StructuredSpec("json_schema", {"type": "integer"}))
    matcher = GrammarMatcher(grammar, eos_token_ids=[0])
    assert not matcher.accept_token(0)  # EOS before anything
    assert not matcher.accept_token(10)  # "a"
    assert not matcher.allowed_tokens()[len(TOKENS) :].any()  # padding ids
    assert matcher.accept_token(9) and matcher.is_accepting() and not matcher.is_terminated()
    rows = np.zeros((2, tiny.vocab_size), dtype=bool)
    fill_masks([matcher, None], rows)
    assert rows[0, 0] and rows[0, 8] and not rows[0, 10] and rows[1].all()


def test_compiler_caches_by_spec(tiny):
    compiler = GrammarCompiler(tiny, max_entries=2)
    first = compiler.compile(StructuredSpec("json_schema", {"type": "integer"}))
    assert compiler.compile(StructuredSpec("json_schema", {"type": "integer"})) is first
    compiler.compile(StructuredSpec("regex", "a+"))
    compiler.compile(StructuredSpec("choice", ["x"]))
    assert compiler.compile(StructuredSpec("json_schema", {"type": "integer"})) is not first
    assert compiler.num_compiled == 4


def test_mask_cache_is_bounded(tiny):
    grammar = GrammarCompiler(tiny, max_mask_cache_bytes=2 * tiny.vocab_size).compile(
        StructuredSpec("json_schema", {"type": "string"})
    )
    for state in range(1, grammar.automaton.num_states):
        grammar.masker.allowed(state)
    assert len(grammar.masker._cache) == 2


def test_tool_call_spec():
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        },
        {
            "type": "function",
            "function": {
                "name": "add",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                    "required": ["a", "b"],
                },
            },
        },
    ]
    automaton = compile_automaton(tool_call_spec(tools))
    good = '<tool_call>{"name":"add","arguments":{"a":1,"b":2}}</tool_call>'
    assert automaton.accepts(good.encode())
    assert automaton.accepts(
        b'<tool_call>{"name":"get_weather","arguments":{"city":"Oslo"}}</tool_call>'
    )
    assert not automaton.accepts(
        b'<tool_call>{"name":"add","arguments":{"city":"Oslo"}}</tool_call>'
    )
    assert not automaton.accepts(good[:-1].encode())
    assert automaton.is_final(automaton.step(automaton.start, good.encode()))


def test_json_object_choice_and_regex_kinds():
    json_object = compile_automaton(StructuredSpec("json_object"))
    assert json_object.accepts(
        json.dumps({"a": [1, {"b": None}], "c": "d"}, separators=(",", ":")).encode()
    )
    assert not json_object.accepts(b"[1]") and not json_object.accepts(b'{"a" :1}')
    choice = compile_automaton(StructuredSpec("choice", ["yes", "no", "maybe so"]))
    assert choice.accepts(b"maybe so") and not choice.accepts(b"may")
    regex = compile_automaton(StructuredSpec("regex", r"\d{3}-[A-Z]+"))
    assert regex.accepts(b"123-AB") and not regex.accepts(b"123-")


def test_recursive_ref_is_unrolled_to_the_bound():
    automaton = compile_automaton(
        StructuredSpec("json_schema", CORPUS["ref-recursive-list"], max_recursion=2)
    )
    nested = lambda n: {"v": 1, "next": None if n == 0 else nested(n - 1)}  # noqa: E731
    texts = [json.dumps(nested(n), separators=(",", ":")).encode() for n in range(6)]
    assert [automaton.accepts(t) for t in texts] == [
        True,
        True,
        True,
        False,
        False,
        False,
    ]  # the root + 2 nested
