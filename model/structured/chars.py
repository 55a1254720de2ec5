"""Character sets (sorted code-point ranges) spelled as UTF-8 byte nodes, raw or JSON-escaped.

A JSON string's characters have one spelling each here, the one ``json.dumps(...,
ensure_ascii=False)`` writes: raw UTF-8, except ``"`` ``\\`` and control characters, which
use ``\\"`` ``\\\\`` ``\\b\\f\\n\\r\\t`` or ``\\u00xx``. One spelling per character keeps
``maxLength`` and excluded property names exact.
"""

from __future__ import annotations

from model.structured.nodes import EMPTY, Bytes, Node, alt, seq

MAX_CODE_POINT = 0x10FFFF
Ranges = tuple[tuple[int, int], ...]

ANY: Ranges = ((0, 0xD7FF), (0xE000, MAX_CODE_POINT))  # every scalar value (no surrogates)
DIGIT: Ranges = ((0x30, 0x39),)
WORD: Ranges = ((0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A))
SPACE: Ranges = ((0x09, 0x0D), (0x20, 0x20))
ASCII: Ranges = ((0, 0x7F),)
_JSON_SPECIAL: Ranges = ((0, 0x1F), (0x22, 0x22), (0x5C, 0x5C))
_SHORT_ESCAPES = {0x22: '\\"', 0x5C: "\\\\", 8: "\\b", 12: "\\f", 10: "\\n", 13: "\\r", 9: "\\t"}


def normalize(ranges: list[tuple[int, int]] | Ranges) -> Ranges:
    """Sort and merge overlapping or adjacent ranges."""
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def intersect(a: Ranges, b: Ranges) -> Ranges:
    out = []
    for lo1, hi1 in a:
        for lo2, hi2 in b:
            lo, hi = max(lo1, lo2), min(hi1, hi2)
            if lo <= hi:
                out.append((lo, hi))
    return normalize(out)


def subtract(a: Ranges, b: Ranges) -> Ranges:
    out = list(a)
    for blo, bhi in b:
        nxt = []
        for lo, hi in out:
            if bhi < lo or blo > hi:
                nxt.append((lo, hi))
                continue
            if lo < blo:
                nxt.append((lo, blo - 1))
            if hi > bhi:
                nxt.append((bhi + 1, hi))
        out = nxt
    return normalize(out)


def negate(ranges: Ranges) -> Ranges:
    return subtract(ANY, ranges)


def _utf8_pieces(lo: int, hi: int, out: list[list[tuple[int, int]]]) -> None:
    # Split [lo, hi] until both ends encode with the same length and each continuation byte
    # spans a whole 0x80-0xBF run below the first differing one (the classic utf8-ranges cut).
    if lo > hi:
        return
    if lo <= 0xDFFF and hi >= 0xD800:
        _utf8_pieces(lo, 0xD7FF, out)
        _utf8_pieces(0xE000, hi, out)
        return
    for boundary in (0x7F, 0x7FF, 0xFFFF):
        if lo <= boundary < hi:
            _utf8_pieces(lo, boundary, out)
            _utf8_pieces(boundary + 1, hi, out)
            return
    length = len(chr(lo).encode("utf-8"))
    for i in range(1, length):
        m = (1 << (6 * i)) - 1
        if lo & ~m != hi & ~m:
            if lo & m:
                _utf8_pieces(lo, lo | m, out)
                _utf8_pieces((lo | m) + 1, hi, out)
                return
            if hi & m != m:
                _utf8_pieces(lo, (hi & ~m) - 1, out)
                _utf8_pieces(hi & ~m, hi, out)
                return
    out.append(list(zip(chr(lo).encode("utf-8"), chr(hi).encode("utf-8"), strict=True)))


def _byte_range(lo: int, hi: int) -> Bytes:
    return Bytes(((1 << (hi + 1)) - 1) ^ ((1 << lo) - 1))


def utf8_node(ranges: Ranges) -> Node:
    """One character from ``ranges``, as raw UTF-8 bytes."""
    pieces: list[list[tuple[int, int]]] = []
    for lo, hi in ranges:
        _utf8_pieces(max(lo, 0), min(hi, MAX_CODE_POINT), pieces)
    # One-byte pieces share a single byte mask; longer ones stay a sequence each.
    single = 0
    multi = []
    for piece in pieces:
        if len(piece) == 1:
            single |= _byte_range(*piece[0]).mask
        else:
            multi.append(seq(*(_byte_range(lo, hi) for lo, hi in piece)))
    return alt(*([Bytes(single)] if single else []), *multi)


def json_escape(code_point: int) -> str:
    """The spelling of one character inside a JSON string."""
    if code_point in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[code_point]
    if code_point < 0x20:
        return f"\\u{code_point:04x}"
    return chr(code_point)


def json_char_node(ranges: Ranges) -> Node:
    """One character from ``ranges`` as it is spelled inside a JSON string."""
    raw = subtract(ranges, _JSON_SPECIAL)
    escapes = [
        json_escape(cp).encode()
        for lo, hi in intersect(ranges, _JSON_SPECIAL)
        for cp in range(lo, hi + 1)
    ]
    return alt(*([utf8_node(raw)] if raw else []), *([literal_set(escapes)] if escapes else []))


def literal_set(strings: list[bytes]) -> Node:
    """One of ``strings``, factored as a trie (shared prefixes once, last bytes as one mask):
    the 34 escapes become ``\\`` then a handful of states instead of 34 chains."""
    if b"" in strings:
        rest = [s for s in strings if s]
        return alt(EMPTY, literal_set(rest)) if rest else EMPTY
    by_first: dict[int, list[bytes]] = {}
    for string in strings:
        by_first.setdefault(string[0], []).append(string[1:])
    # First bytes whose continuations are the same set share one byte mask.
    by_rest: dict[frozenset[bytes], int] = {}
    for first, rests in by_first.items():
        key = frozenset(rests)
        by_rest[key] = by_rest.get(key, 0) | 1 << first
    return alt(*(seq(Bytes(mask), literal_set(sorted(rests))) for rests, mask in by_rest.items()))


def char_node(ranges: Ranges, is_json: bool) -> Node:
    return json_char_node(ranges) if is_json else utf8_node(ranges)
