"""Integer and decimal ranges as exact digit automata (no leading zeros, no ``-0``).

Integers: ``[lo, hi]`` with either end open, split by digit count, each count a digit-wise
range. Numbers with a bound are written without an exponent and compared exactly as decimals:
the integer part against the bound's integer part, the fraction digit by digit against the
bound's fraction (``frac`` below), so ``exclusiveMinimum: 5`` allows ``5.01`` but not ``5.0``.
An unbounded number is any JSON number.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache

from model.structured.nodes import EMPTY, NEVER, Bytes, Node, Repeat, alt, literal, seq

_DIGIT = Bytes(sum(1 << b for b in range(ord("0"), ord("9") + 1)))
_NONZERO = Bytes(_DIGIT.mask & ~(1 << ord("0")))
JSON_NUMBER = seq(
    alt(EMPTY, literal("-")),
    alt(literal("0"), seq(_NONZERO, Repeat(_DIGIT, 0, None))),
    alt(EMPTY, seq(literal("."), Repeat(_DIGIT, 1, None))),
    alt(
        EMPTY,
        seq(
            Bytes((1 << ord("e")) | (1 << ord("E"))),
            alt(EMPTY, literal("-"), literal("+")),
            Repeat(_DIGIT, 1, None),
        ),
    ),
)


def _digit_set(low: int, high: int) -> Node:
    return Bytes(sum(1 << (ord("0") + d) for d in range(low, high + 1))) if low <= high else NEVER


@lru_cache(maxsize=4096)
def _same_length_range(low: str, high: str) -> Node:
    """Digit strings of ``len(low)`` between ``low`` and ``high`` (inclusive)."""
    if not low:
        return EMPTY
    if low == high:
        return literal(low)
    a, b = int(low[0]), int(high[0])
    rest = len(low) - 1
    if a == b:
        return seq(literal(low[0]), _same_length_range(low[1:], high[1:]))
    if low[1:] == "0" * rest and high[1:] == "9" * rest:
        return seq(_digit_set(a, b), Repeat(_DIGIT, rest, rest))
    return alt(
        seq(literal(low[0]), _same_length_range(low[1:], "9" * rest)),
        seq(_digit_set(a + 1, b - 1), Repeat(_DIGIT, rest, rest)),
        seq(literal(high[0]), _same_length_range("0" * rest, high[1:])),
    )


def uint_range(low: int, high: int | None) -> Node:
    """Non-negative integers in ``[low, high]`` (``high`` None: unbounded), canonical digits."""
    assert low >= 0
    if high is not None and high < low:
        return NEVER
    parts = []
    last = len(str(high)) if high is not None else len(str(low))
    for length in range(len(str(low)), last + 1):
        a = max(low, 10 ** (length - 1) if length > 1 else 0)
        b = 10**length - 1 if high is None else min(high, 10**length - 1)
        if a <= b:
            parts.append(_same_length_range(str(a), str(b)))
    if high is None:
        parts.append(seq(_NONZERO, Repeat(_DIGIT, last, None)))
    return alt(*parts)


def integer_node(low: int | None, high: int | None) -> Node:
    """JSON integers in ``[low, high]`` (either may be None)."""
    parts = []
    if high is None or high >= 0:
        parts.append(uint_range(max(low or 0, 0), high))
    if low is None or low < 0:
        magnitude_low = 1 if high is None or high >= 0 else -high
        parts.append(seq(literal("-"), uint_range(magnitude_low, None if low is None else -low)))
    return alt(*parts)


@lru_cache(maxsize=4096)
def _frac(
    low: str | None, is_low_strict: bool, high: str | None, is_high_strict: bool
) -> tuple[bool, Node]:
    """Fraction digit strings f (read as 0.f) with low <(=) f <(=) high: (whether "" is one,
    the node for the non-empty ones). None is an open end; "" a bound whose digits ran out
    (the rest compares with zeros)."""
    if low == "" and not is_low_strict:
        low = None
    if high == "" and is_high_strict:
        return False, NEVER
    if not low and not high:  # neither end has digits left: four closed forms
        if low is None and high is None:
            return True, Repeat(_DIGIT, 1, None)
        if high is None:  # above zero: a non-zero digit somewhere
            return False, seq(Repeat(literal("0"), 0, None), _NONZERO, Repeat(_DIGIT, 0, None))
        return (True, Repeat(literal("0"), 1, None)) if low is None else (False, NEVER)
    is_empty_ok = (low is None or (set(low) <= {"0"} and not is_low_strict)) and (
        high is None or not is_high_strict or bool(set(high) - {"0"})
    )
    low_digit = None if low is None else int(low[0]) if low else 0
    high_digit = None if high is None else int(high[0]) if high else 0
    groups: dict[tuple[str | None, str | None], list[int]] = {}
    for d in range(10):
        if low_digit is not None and d < low_digit or high_digit is not None and d > high_digit:
            continue
        next_low = (low[1:] if low else low) if low_digit == d else None
        next_high = (high[1:] if high else high) if high_digit == d else None
        groups.setdefault((next_low, next_high), []).append(d)
    parts = []
    for (next_low, next_high), digits in groups.items():
        rest = _optional_frac(*_frac(next_low, is_low_strict, next_high, is_high_strict))
        if rest != NEVER:
            parts.append(seq(_digit_set(digits[0], digits[-1]), rest))
    return is_empty_ok, alt(*parts)


def _optional_frac(is_empty_ok: bool, nonempty: Node) -> Node:
    return alt(*([EMPTY] if is_empty_ok else []), *([nonempty] if nonempty != NEVER else []))


def _split(value: Decimal) -> tuple[int, str]:
    whole, _, fraction = format(value, "f").partition(".")
    return int(whole), fraction.rstrip("0")


def _with_fraction(
    whole: Node, low: str | None, is_low_strict: bool, high: str | None, is_high_strict: bool
) -> Node:
    is_empty_ok, nonempty = _frac(low, is_low_strict, high, is_high_strict)
    # "5." is not JSON: a written fraction has a digit; no fraction at all reads as .0
    written = [seq(literal("."), nonempty)] if nonempty != NEVER else []
    return seq(whole, alt(*([EMPTY] if is_empty_ok else []), *written))


def _magnitude(
    low: Decimal, is_low_strict: bool, high: Decimal | None, is_high_strict: bool
) -> Node:
    """Non-negative decimals y with low <(=) y <(=) high, without sign or exponent."""
    low_int, low_frac = _split(low)
    if high is None:
        return alt(
            _with_fraction(literal(str(low_int)), low_frac, is_low_strict, None, False),
            _with_fraction(uint_range(low_int + 1, None), None, False, None, False),
        )
    if high < low:
        return NEVER
    high_int, high_frac = _split(high)
    if low_int == high_int:
        return _with_fraction(
            literal(str(low_int)), low_frac, is_low_strict, high_frac, is_high_strict
        )
    return alt(
        _with_fraction(literal(str(low_int)), low_frac, is_low_strict, None, False),
        _with_fraction(uint_range(low_int + 1, high_int - 1), None, False, None, False),
        _with_fraction(literal(str(high_int)), None, False, high_frac, is_high_strict),
    )


def decimal_node(
    low: Decimal | None, is_low_strict: bool, high: Decimal | None, is_high_strict: bool
) -> Node:
    """JSON numbers in the range (either end None), exact; no exponent once bounded."""
    if low is None and high is None:
        return JSON_NUMBER
    parts = []
    if high is None or high > 0 or (high == 0 and not is_high_strict):
        if low is not None and low >= 0:
            parts.append(_magnitude(low, is_low_strict, high, is_high_strict))
        else:
            parts.append(_magnitude(Decimal(0), False, high, is_high_strict))
    if low is None or low < 0:
        if high is not None and high < 0:
            magnitude_low, is_strict = -high, is_high_strict
        else:
            magnitude_low, is_strict = Decimal(0), True
        magnitude_high = None if low is None else -low
        parts.append(
            seq(literal("-"), _magnitude(magnitude_low, is_strict, magnitude_high, is_low_strict))
        )
    return alt(*parts)
