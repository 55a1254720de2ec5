"""Regexes against Python's re.fullmatch on generated strings; integer and decimal ranges
against brute force."""

from __future__ import annotations

import random
import re
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from model.structured import SpecError, StructuredSpec, UnsupportedKeywordError, compile_automaton
from model.structured.automaton import compile_node
from model.structured.numbers import decimal_node, integer_node

PATTERNS = [
    r"abc",
    r"a|b|cd",
    r"[a-c]+x?",
    r"[^a-c]{2}",
    r"(ab|c)*d",
    r"a{2}",
    r"a{1,3}b{2,}",
    r"(?:x|yz){0,2}",
    r"(?P<n>a+)b",
    r"\d\w\s",
    r"[\d_-]+",
    r"\D\W",
    r"\.\*\+\?",
    r"\x41\u0062",
    r"[-a]b[a-]",
    r"a.c",
    r"^ab$",
    r"^(a|b)+$",
    r"[]a]+",
    r"a+?b*?",
    r"é[ü-ÿ]",
    r"[\t\n]x",
]
ALPHABET = "abcdxyz_- .*+?\t\n0129AéüÿA]"


@pytest.mark.parametrize("pattern", PATTERNS)
def test_regex_matches_like_python(pattern):
    automaton = compile_automaton(StructuredSpec("regex", pattern))
    rng = random.Random(pattern)
    compiled = re.compile(pattern)
    alphabet = ALPHABET
    if re.search(r"\\[dDwWsS]", pattern):
        # Shorthands are ASCII here (a subset of Python's Unicode ones): compare on ASCII text.
        alphabet = "".join(c for c in ALPHABET if c.isascii())
    candidates = {
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 6))) for _ in range(3000)
    }
    # Also the strings the regex likes: random strings rarely match longer patterns.
    candidates |= {
        s[:k] for s in candidates for k in range(len(s) + 1) if compiled.fullmatch(s[:k])
    }
    for text in candidates:
        expected = compiled.fullmatch(text) is not None
        assert automaton.accepts(text.encode()) == expected, (pattern, text)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="ab(c)", min_size=0, max_size=8))
def test_regex_on_generated_text_with_groups(text):
    automaton = compile_automaton(StructuredSpec("regex", r"(a(b|c)*)+|\(c\)"))
    assert automaton.accepts(text.encode()) == (re.fullmatch(r"(a(b|c)*)+|\(c\)", text) is not None)


@pytest.mark.parametrize(
    ("pattern", "construct"),
    [
        (r"(a)\1", "backreference"),
        (r"(?=a)", "lookaround"),
        (r"\bx", "escape"),
        (r"a^", "after the start"),
        (r"a$b", "before the end"),
        (r"(?i)a", "group"),
        (r"a*+", "possessive"),
    ],
)
def test_unsupported_regex_constructs_raise(pattern, construct):
    with pytest.raises(UnsupportedKeywordError, match=construct) as info:
        compile_automaton(StructuredSpec("regex", pattern))
    assert info.value.keyword == "regex" and info.value.param == "response_format"


@pytest.mark.parametrize("pattern", ["(a", "a)", "[a", "*a", "a{3,1}", r"\x4"])
def test_malformed_regex_raises(pattern):
    with pytest.raises(SpecError):
        compile_automaton(StructuredSpec("regex", pattern))


def test_negated_shorthands_stay_inside_python_semantics():
    # \\D must never produce a character Python's Unicode \\d matches (jsonschema uses re).
    automaton = compile_automaton(StructuredSpec("regex", r"\D"))
    assert automaton.accepts(b"a") and not automaton.accepts("\u0663".encode())


def test_search_semantics_of_schema_patterns():
    automaton = compile_automaton(
        StructuredSpec("json_schema", {"type": "string", "pattern": "ab|^x"})
    )
    for text, expected in [("zabz", True), ("ab", True), ("xz", True), ("zx", False), ("a", False)]:
        assert automaton.accepts(f'"{text}"'.encode()) == expected


INT_RANGES = [
    (0, 0),
    (0, 9),
    (5, 123),
    (-17, 17),
    (-999, -100),
    (None, -5),
    (None, 0),
    (42, None),
    (-3, None),
    (None, None),
    (99, 10001),
    (1000, 1000),
]


@pytest.mark.parametrize(("low", "high"), INT_RANGES)
def test_integer_ranges_are_exact(low, high):
    automaton = compile_node(integer_node(low, high))
    for x in range(-12000, 12000):
        expected = (low is None or x >= low) and (high is None or x <= high)
        assert automaton.accepts(str(x).encode()) == expected, x
    assert not automaton.accepts(b"-0") and not automaton.accepts(b"01")


@pytest.mark.parametrize(
    "bounds",
    [
        ("0", False, "1", False),
        ("5", True, None, False),
        ("-2.5", False, "3.75", True),
        (None, False, "-0.01", False),
        ("0.1", True, "0.1001", False),
        ("-1", True, "0", True),
        ("10.05", False, "12", False),
    ],
)
def test_decimal_ranges_are_exact(bounds):
    low, is_low_strict, high, is_high_strict = bounds
    low = None if low is None else Decimal(low)
    high = None if high is None else Decimal(high)
    automaton = compile_node(decimal_node(low, is_low_strict, high, is_high_strict))
    rng = random.Random(str(bounds))
    for _ in range(4000):
        whole = rng.choice(["0", "1", "2", "3", "5", "10", "11", "12", "123"])
        fraction = "".join(rng.choice("00159") for _ in range(rng.randint(0, 5)))
        text = ("-" if rng.random() < 0.4 else "") + whole + ("." + fraction if fraction else "")
        value = Decimal(text)
        expected = (
            (low is None or (value > low if is_low_strict else value >= low))
            and (high is None or (value < high if is_high_strict else value <= high))
            and not (text.startswith("-") and value == 0)
        )
        assert automaton.accepts(text.encode()) == expected, text
