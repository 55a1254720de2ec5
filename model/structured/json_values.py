"""JSON scalars, strings (lengths, patterns, formats), literals and depth-bounded generic JSON.

Everything is compact (no whitespace) and strings use one spelling per character (see
``chars.py``), the form ``json.dumps(value, separators=(",", ":"), ensure_ascii=False)``
writes.
"""

from __future__ import annotations

import json
from typing import Any

from model.structured.chars import ANY, Ranges, json_char_node, json_escape, subtract
from model.structured.errors import UnsupportedKeywordError
from model.structured.nodes import (
    COMMA,
    EMPTY,
    NEVER,
    Alt,
    Node,
    Repeat,
    SepRepeat,
    alt,
    literal,
    seq,
)
from model.structured.numbers import JSON_NUMBER
from model.structured.regex import regex_node

QUOTE = literal('"')
COLON = literal(":")
_YEAR = r"(?:[1-9]\d{3}|0[1-9]\d{2}|00[1-9]\d|000[1-9])"
_LEAP_YEAR = r"(?:\d\d(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)"
_DATE = (
    rf"(?:{_YEAR}-(?:(?:0[13578]|1[02])-(?:0[1-9]|[12]\d|3[01])|(?:0[469]|11)-(?:0[1-9]|[12]\d|30)"
    rf"|02-(?:0[1-9]|1\d|2[0-8]))|{_LEAP_YEAR}-02-29)"
)
_TIME = r"(?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)"
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,20}[A-Za-z0-9])?"
_HEX = "[0-9a-fA-F]"
# Format name -> the fullmatch regex of the string's content (each a subset of the format).
FORMATS = {
    "date": _DATE,
    "time": _TIME,
    "date-time": f"{_DATE}T{_TIME}",
    "uuid": f"{_HEX}{{8}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{4}}-{_HEX}{{12}}",
    # Bounded parts: an LLM (or a random walk) must reach the '@' and the end.
    "email": rf"[A-Za-z0-9_%+-]{{1,32}}(?:\.[A-Za-z0-9_%+-]{{1,16}})?@(?:{_LABEL}\.){{1,3}}[A-Za-z]{{2,12}}",
    "ipv4": rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}",
}

ANY_CHAR = json_char_node(ANY)
ANY_STRING = seq(QUOTE, Repeat(ANY_CHAR, 0, None), QUOTE)
SCALARS = alt(ANY_STRING, JSON_NUMBER, literal("true"), literal("false"), literal("null"))


def json_literal(value: Any) -> Node:
    """Exactly the compact serialization of ``value``."""
    return literal(json.dumps(value, separators=(",", ":"), ensure_ascii=False))


def string_node(
    min_length: int = 0,
    max_length: int | None = None,
    pattern: str | None = None,
    format_name: str | None = None,
) -> Node:
    """A JSON string (quotes included) under the string keywords given."""
    if format_name is not None and format_name not in FORMATS:
        raise UnsupportedKeywordError("format", f"format {format_name!r}")
    constraints = [
        pattern is not None,
        format_name is not None,
        (min_length, max_length) != (0, None),
    ]
    if sum(constraints) > 1:
        # Each is a separate automaton; their intersection is not built (yet).
        keyword = "pattern" if pattern is not None else "format"
        raise UnsupportedKeywordError(keyword, "combined with another string constraint")
    if pattern is not None:
        content = regex_node(pattern, is_json=True, is_search=True)
    elif format_name is not None:
        content = regex_node(FORMATS[format_name], is_json=True, is_search=False, keyword="format")
    else:
        content = Repeat(ANY_CHAR, min_length, max_length)
    return seq(QUOTE, content, QUOTE)


def string_except(names: list[str]) -> Node:
    """A JSON string (quotes included) equal to none of ``names``: a walk down their
    character trie, where leaving the trie frees the rest."""
    trie: dict = {}
    for name in names:
        node = trie
        for ch in name:
            node = node.setdefault(ord(ch), {})
        node[None] = True

    def below(node: dict) -> Node:
        children = [cp for cp in node if cp is not None]
        other: Ranges = subtract(ANY, tuple((cp, cp) for cp in sorted(children)))
        branches = [seq(literal(json_escape(cp)), below(node[cp])) for cp in children]
        branches.append(seq(json_char_node(other), Repeat(ANY_CHAR, 0, None)))
        if None not in node:
            branches.append(EMPTY)
        return alt(*branches)

    return seq(QUOTE, below(trie), QUOTE)


def any_json(depth: int) -> Node:
    """Any JSON value nested at most ``depth`` containers deep (0: scalars only)."""
    if depth <= 0:
        return SCALARS
    inner = any_json(depth - 1)
    return alt(
        SCALARS,
        any_object(depth, inner),
        seq(literal("["), SepRepeat(inner, COMMA, 0, None), literal("]")),
    )


def any_object(depth: int, inner: Node | None = None) -> Node:
    """Any JSON object whose values nest at most ``depth - 1`` containers deep."""
    inner = any_json(depth - 1) if inner is None else inner
    member = seq(ANY_STRING, COLON, inner)
    return seq(literal("{"), SepRepeat(member, COMMA, 0, None), literal("}"))


def is_never(node: Node) -> bool:
    return node == NEVER or (isinstance(node, Alt) and not node.items)
