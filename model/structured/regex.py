"""Regular expressions (the syntax JSON Schema ``pattern`` and regex specs use) -> nodes.

Supported: literals, ``.``, classes ``[a-z\\d]`` / ``[^...]``, escapes (``\\n \\t \\xHH \\uHHHH``,
escaped punctuation), ``\\d \\w \\s`` and their negations, groups ``(...)`` ``(?:...)``
``(?P<n>...)`` ``(?<n>...)``, alternation, ``* + ? {m} {m,} {m,n}`` (lazy forms too: same
language), and ``^``/``$`` at the ends of a top-level alternative. ``\\d \\w \\s`` are ASCII, and
negated forms (``\\D``, or a shorthand inside ``[^...]``) stay within ASCII, so the automaton
only produces strings Python's Unicode ``re`` (what jsonschema runs) also accepts.
Raises UnsupportedKeywordError for backreferences, lookaround, ``\\b``, inline flags,
possessive quantifiers and anchors anywhere else.
"""

from __future__ import annotations

from model.structured.chars import (
    ANY,
    ASCII,
    DIGIT,
    SPACE,
    WORD,
    Ranges,
    char_node,
    intersect,
    negate,
    normalize,
)
from model.structured.errors import SpecError, UnsupportedKeywordError
from model.structured.nodes import EMPTY, Node, Repeat, alt, seq

_SHORTHAND = {"d": DIGIT, "w": WORD, "s": SPACE}
_CONTROL_ESCAPES = {"n": 10, "t": 9, "r": 13, "f": 12, "v": 11, "0": 0, "a": 7}
MAX_REPEAT = 10_000


def regex_node(pattern: str, is_json: bool, is_search: bool, keyword: str = "pattern") -> Node:
    """The node for ``pattern``. ``is_json``: spell characters as inside a JSON string;
    ``is_search``: ``re.search`` semantics (unanchored ends match any text), else fullmatch."""
    branches = _Parser(pattern, is_json, keyword).parse()
    anything = Repeat(char_node(ANY, is_json), 0, None)
    nodes = []
    for node, is_start_anchored, is_end_anchored in branches:
        before = EMPTY if (is_start_anchored or not is_search) else anything
        after = EMPTY if (is_end_anchored or not is_search) else anything
        nodes.append(seq(before, node, after))
    return alt(*nodes)


class _Parser:
    def __init__(self, pattern: str, is_json: bool, keyword: str) -> None:
        self.text = pattern
        self.pos = 0
        self.is_json = is_json
        self.keyword = keyword

    def error(self, message: str) -> SpecError:
        return SpecError(f"{self.keyword}: {message} at {self.pos} in {self.text!r}", self.keyword)

    def unsupported(self, what: str) -> UnsupportedKeywordError:
        return UnsupportedKeywordError(self.keyword, f"{what} in {self.text!r}")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def take(self) -> str:
        if self.pos >= len(self.text):
            raise self.error("unexpected end")
        self.pos += 1
        return self.text[self.pos - 1]

    def parse(self) -> list[tuple[Node, bool, bool]]:
        branches = []
        while True:
            is_start = self.peek() == "^"
            if is_start:
                self.pos += 1
            node, is_end = self.sequence(is_top=True)
            branches.append((node, is_start, is_end))
            if self.peek() is None:
                return branches
            if self.take() != "|":
                raise self.error("unbalanced ')'")

    def alternation(self) -> Node:
        options = [self.sequence(is_top=False)[0]]
        while self.peek() == "|":
            self.pos += 1
            options.append(self.sequence(is_top=False)[0])
        return alt(*options)

    def sequence(self, is_top: bool) -> tuple[Node, bool]:
        items: list[Node] = []
        while (c := self.peek()) is not None and c not in "|)":
            if c == "$":
                self.pos += 1
                if is_top and self.peek() in (None, "|"):
                    return seq(*items), True
                raise self.unsupported("'$' before the end")
            if c == "^":
                raise self.unsupported("'^' after the start")
            items.append(self.quantified(self.atom()))
        return seq(*items), False

    def quantified(self, node: Node) -> Node:
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.pos += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (bounds := self.braces()) is not None:
                low, high = bounds
            else:
                return node
            if self.peek() == "?":
                self.pos += 1  # lazy: the same language
            elif self.peek() == "+":
                raise self.unsupported("a possessive quantifier")
            node = Repeat(node, low, high)

    def braces(self) -> tuple[int, int | None] | None:
        # `{m}`, `{m,}`, `{m,n}`; anything else is a literal '{' (as in Python).
        end = self.text.find("}", self.pos)
        if end < 0:
            return None
        body = self.text[self.pos + 1 : end]
        low, comma, high = body.partition(",")
        if not low.isdigit() or (high and not high.isdigit()):
            return None
        bounds = (int(low), int(high) if high else (None if comma else int(low)))
        if bounds[1] is not None and bounds[1] < bounds[0]:
            raise self.error("a {m,n} quantifier with n < m")
        if max(bounds[0], bounds[1] or 0) > MAX_REPEAT:
            raise self.unsupported(f"a repetition count over {MAX_REPEAT}")
        self.pos = end + 1
        return bounds

    def atom(self) -> Node:
        c = self.take()
        if c == "(":
            if self.peek() == "?":
                self.group_prefix()
            node = self.alternation()
            if self.peek() != ")":
                raise self.error("missing ')'")
            self.pos += 1
            return node
        if c == "[":
            return char_node(self.char_class(), self.is_json)
        if c == ".":
            return char_node(negate(((10, 10),)), self.is_json)  # all but newline
        if c == "\\":
            return char_node(self.escape(in_class=False), self.is_json)
        if c in "*+?":
            raise self.error("nothing to repeat")
        return char_node(((ord(c), ord(c)),), self.is_json)

    def group_prefix(self) -> None:
        self.pos += 1  # '?'
        c = self.take()
        if c == ":":
            return
        if c == "P" and self.peek() == "<" or c == "<" and self.peek() not in ("=", "!"):
            if c == "P":
                self.pos += 1
            end = self.text.find(">", self.pos)
            if end < 0:
                raise self.error("unterminated group name")
            self.pos = end + 1
            return
        if c in "=!" or c == "<":
            raise self.unsupported("lookaround")
        raise self.unsupported(f"the group construct '(?{c}'")

    def escape(self, in_class: bool) -> Ranges:
        c = self.take()
        if c in _SHORTHAND:
            return _SHORTHAND[c]
        if c.lower() in _SHORTHAND:
            # Negated shorthands stay within ASCII: Python's Unicode \d \w \s are larger.
            return intersect(negate(_SHORTHAND[c.lower()]), ASCII)
        if c == "b" and in_class:
            return ((8, 8),)
        if c in _CONTROL_ESCAPES:
            cp = _CONTROL_ESCAPES[c]
            return ((cp, cp),)
        if c in "xu":
            width = 2 if c == "x" else 4
            digits = self.text[self.pos : self.pos + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"bad \\{c} escape")
            self.pos += width
            cp = int(digits, 16)
            return ((cp, cp),)
        if c.isdigit():
            raise self.unsupported("a backreference")
        if c.isalnum():
            raise self.unsupported(f"the escape '\\{c}'")
        return ((ord(c), ord(c)),)

    def char_class(self) -> Ranges:
        is_negated = self.peek() == "^"
        if is_negated:
            self.pos += 1
        ranges: list[tuple[int, int]] = []
        has_shorthand = False
        is_first = True
        while True:
            c = self.take()
            if c == "]" and not is_first:
                break
            is_first = False
            if c == "\\":
                has_shorthand |= self.peek() in "dDwWsS"
                item = self.escape(in_class=True)
            elif c == "[" and self.peek() == ":":
                raise self.unsupported("a POSIX class")
            else:
                item = ((ord(c), ord(c)),)
            # A range `a-z`, unless the '-' is the last thing in the class.
            is_single = len(item) == 1 and item[0][0] == item[0][1]
            if (
                is_single
                and self.peek() == "-"
                and self.text[self.pos + 1 : self.pos + 2] not in ("]", "")
            ):
                self.pos += 1
                end = self.take()
                high = self.escape(in_class=True) if end == "\\" else ((ord(end), ord(end)),)
                if len(high) != 1 or high[0][0] != high[0][1] or high[0][0] < item[0][0]:
                    raise self.error("a bad class range")
                item = ((item[0][0], high[0][0]),)
            ranges.extend(item)
        result = normalize(ranges)
        if not is_negated:
            return result
        result = negate(result)
        return intersect(result, ASCII) if has_shorthand else result
