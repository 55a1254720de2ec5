"""The regular-expression tree every spec compiles to, and its Thompson NFA over bytes.

Nodes are byte-level: a character class is already spelled as UTF-8 byte ranges
(``chars.py``), a JSON string already has its escapes (``json_values.py``). Two nodes exist for
size rather than expressiveness: ``SepRepeat`` (``item (sep item)*``) and ``Members`` (object
members with optional ones and their commas) emit each sub-automaton once instead of once per
position, which keeps nested generic JSON linear in the depth bound instead of exponential.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.structured.errors import SpecError

MAX_NFA_STATES = 400_000


@dataclass(frozen=True, slots=True)
class Bytes:
    """One byte from a set; ``mask`` has bit b set when byte b is allowed."""

    mask: int


@dataclass(frozen=True, slots=True)
class Seq:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Alt:
    items: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Repeat:
    item: Node
    min: int
    max: int | None  # None: unbounded


@dataclass(frozen=True, slots=True)
class SepRepeat:
    """``item (sep item)*`` with between ``min`` and ``max`` items (0 items: the empty string)."""

    item: Node
    sep: Node
    min: int
    max: int | None


@dataclass(frozen=True, slots=True)
class Members:
    """Object members in a fixed order: ``(member, is_required)`` pairs joined by commas, then
    any number of ``extra`` members (None: no additional properties)."""

    props: tuple[tuple[Node, bool], ...]
    extra: Node | None


Node = Bytes | Seq | Alt | Repeat | SepRepeat | Members

EMPTY = Seq(())
NEVER = Alt(())
COMMA = Bytes(1 << ord(","))


def literal(data: bytes | str) -> Node:
    """The node matching exactly ``data`` (str is UTF-8 encoded)."""
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if len(raw) == 1:
        return Bytes(1 << raw[0])
    return Seq(tuple(Bytes(1 << b) for b in raw))


def seq(*items: Node) -> Node:
    flat: list[Node] = []
    for item in items:
        if item == NEVER:
            return NEVER
        flat.extend(item.items if isinstance(item, Seq) else (item,))
    return flat[0] if len(flat) == 1 else Seq(tuple(flat))


def alt(*items: Node) -> Node:
    flat: list[Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, Alt) else (item,))
    return flat[0] if len(flat) == 1 else Alt(tuple(flat))


class Nfa:
    """Thompson NFA: ``edges[s]`` are ``(byte_mask, target)``, ``eps[s]`` epsilon targets."""

    def __init__(self) -> None:
        self.edges: list[list[tuple[int, int]]] = []
        self.eps: list[list[int]] = []

    def new(self) -> int:
        if len(self.eps) >= MAX_NFA_STATES:
            raise SpecError("the spec is too large to compile (bounded repetitions too big?)")
        self.edges.append([])
        self.eps.append([])
        return len(self.eps) - 1

    def link(self, source: int, target: int) -> None:
        self.eps[source].append(target)

    def emit(self, node: Node, start: int) -> int:
        """Add ``node`` starting at ``start``; return its end state. No fragment loops back to
        the ``start`` it was given, so alternatives may share one start state."""
        if isinstance(node, Bytes):
            end = self.new()
            if node.mask:
                self.edges[start].append((node.mask, end))
            return end
        if isinstance(node, Seq):
            for item in node.items:
                start = self.emit(item, start)
            return start
        if isinstance(node, Alt):
            end = self.new()
            for item in node.items:
                self.link(self.emit(item, start), end)
            return end
        if isinstance(node, Repeat):
            return self._repeat(node, start)
        if isinstance(node, SepRepeat):
            return self._sep_repeat(node, start)
        return self._members(node, start)

    def _repeat(self, node: Repeat, start: int) -> int:
        for _ in range(node.min):
            start = self.emit(node.item, start)
        end = self.new()
        if node.max is None:
            loop = self.new()
            self.link(start, loop)
            self.link(self.emit(node.item, loop), loop)
            self.link(loop, end)
            return end
        for _ in range(node.max - node.min):
            self.link(start, end)
            start = self.emit(node.item, start)
        self.link(start, end)
        return end

    def _sep_repeat(self, node: SepRepeat, start: int) -> int:
        if node.max == 0:
            return start
        end = self.new()
        if node.min == 0:
            self.link(start, end)
        if node.min <= 1 and node.max is None:
            # One shared copy of the item: the separator loops back to its start.
            head = self.new()
            self.link(start, head)
            tail = self.new()
            self.link(self.emit(node.item, head), tail)
            self.link(self.emit(node.sep, tail), head)
            self.link(tail, end)
            return end
        start = self.emit(node.item, start)
        for _ in range(max(node.min, 1) - 1):
            start = self.emit(node.item, self.emit(node.sep, start))
        num_more = None if node.max is None else node.max - max(node.min, 1)
        self.link(self.emit(Repeat(Seq((node.sep, node.item)), 0, num_more), start), end)
        return end

    def _members(self, node: Members, start: int) -> int:
        # Two junctions per position: `none` (no member written yet: the next needs no comma)
        # and `some` (the next needs one). Each member automaton is emitted once, entered from
        # both, and always leaves into `some`.
        none: int | None = start
        some: int | None = None
        for member, is_required in node.props:
            entry, next_some = self.new(), self.new()
            if none is not None:
                self.link(none, entry)
            if some is not None:
                self.link(self.emit(COMMA, some), entry)
            self.link(self.emit(member, entry), next_some)
            if not is_required:
                if some is not None:
                    self.link(some, next_some)
                if none is not None:
                    next_none = self.new()
                    self.link(none, next_none)
                    none = next_none
            else:
                none = None
            some = next_some
        end = self.new()
        if node.extra is not None:
            loop, entry = self.new(), self.new()
            if some is not None:
                self.link(some, loop)
            if none is not None:
                self.link(none, entry)
            self.link(self.emit(COMMA, loop), entry)
            self.link(self.emit(node.extra, entry), loop)
            some = loop
        for junction in (none, some):
            if junction is not None:
                self.link(junction, end)
        return end
