"""The byte DFA a spec compiles to, built from a node tree by subset construction.

State 0 is the dead state (every byte leads back to it); the start state is 1. Every other
state can still reach acceptance: states that cannot (left behind by a recursion cut at its
depth bound, an impossible branch) are pruned into the dead state, so a token whose bytes keep
the automaton out of state 0 always leaves a way to finish.
"""

from __future__ import annotations

import numpy as np

from model.structured.errors import SpecError
from model.structured.nodes import Nfa, Node

DEAD = 0
MAX_DFA_STATES = 200_000


class Automaton:
    """A byte-level DFA: ``table[state, byte]`` is the next state (``DEAD`` = rejected)."""

    def __init__(self, table: np.ndarray, accepting: np.ndarray, start: int) -> None:
        assert table.ndim == 2 and table.shape[1] == 256 and table.dtype == np.int32
        assert accepting.shape == (table.shape[0],) and not accepting[DEAD]
        self.table = table
        self.flat_table = table.reshape(-1)
        self.accepting = accepting
        self.start = start
        self.has_exit = (table != DEAD).any(axis=1)

    @property
    def num_states(self) -> int:
        return int(self.table.shape[0])

    def step(self, state: int, data: bytes) -> int:
        """The state after reading ``data`` from ``state`` (``DEAD`` once rejected)."""
        flat = self.flat_table
        for byte in data:
            state = int(flat[state * 256 + byte])
            if state == DEAD:
                return DEAD
        return state

    def accepts(self, data: bytes) -> bool:
        """Whether ``data`` is one complete instance of the spec."""
        return bool(self.accepting[self.step(self.start, data)])

    def is_accepting(self, state: int) -> bool:
        """The text so far is complete: end-of-sequence may be sampled here."""
        return bool(self.accepting[state])

    def is_final(self, state: int) -> bool:
        """Complete and nothing may follow: only end-of-sequence is allowed (force it)."""
        return bool(self.accepting[state]) and not bool(self.has_exit[state])


def _bits(mask: int) -> np.ndarray:
    """The bytes set in a 256-bit mask, as a bool array."""
    raw = np.frombuffer(mask.to_bytes(32, "little"), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little").astype(bool)


def _byte_classes(masks: set[int]) -> tuple[np.ndarray, dict[int, int]]:
    """Partition the 256 bytes into classes no mask splits: (class of each byte, each mask as
    a bitmask over classes). Partition refinement, one split per mask."""
    classes = [(1 << 256) - 1]
    for mask in masks:
        refined = []
        for group in classes:
            inside, outside = group & mask, group & ~mask
            refined.extend(part for part in (inside, outside) if part)
        classes = refined
    byte_class = np.zeros(256, dtype=np.int64)
    for index, group in enumerate(classes):
        byte_class[_bits(group)] = index
    class_mask = {}
    for mask in masks:
        classes_in = 0
        for index, group in enumerate(classes):
            if group & mask:
                classes_in |= 1 << index
        class_mask[mask] = classes_in
    return byte_class, class_mask


def compile_node(node: Node) -> Automaton:
    """Determinize ``node`` into a pruned byte DFA. Raises SpecError if it matches nothing."""
    nfa = Nfa()
    start = nfa.new()
    final = nfa.emit(node, start)
    masks = {mask for edges in nfa.edges for mask, _ in edges}
    byte_class, class_mask = _byte_classes(masks)
    num_classes = int(byte_class.max()) + 1
    edges = [[(class_mask[m], t) for m, t in out] for out in nfa.edges]

    closures: dict[int, frozenset[int]] = {}

    def closure(state: int) -> frozenset[int]:
        # The states with byte edges (or the final one) reachable through epsilons.
        found = closures.get(state)
        if found is None:
            seen, stack, kept = {state}, [state], []
            while stack:
                s = stack.pop()
                if edges[s] or s == final:
                    kept.append(s)
                for t in nfa.eps[s]:
                    if t not in seen:
                        seen.add(t)
                        stack.append(t)
            found = closures[state] = frozenset(kept)
        return found

    bit_lists: dict[int, list[int]] = {}

    def bits_of(classes: int) -> list[int]:
        found = bit_lists.get(classes)
        if found is None:
            found = bit_lists[classes] = [c for c in range(num_classes) if classes >> c & 1]
        return found

    ids: dict[frozenset[int], int] = {}
    sets: list[frozenset[int]] = [frozenset()]  # the dead state
    rows: list[list[int]] = [[DEAD] * num_classes]
    by_targets: dict[frozenset[int], int] = {}

    def state_of(targets: frozenset[int]) -> int:
        found = by_targets.get(targets)
        if found is None:
            members = frozenset().union(*(closure(t) for t in targets))
            found = ids.get(members)
            if found is None:
                if len(sets) >= MAX_DFA_STATES:
                    raise SpecError("the spec is too large to compile (automaton too big)")
                found = ids[members] = len(sets)
                sets.append(members)
            by_targets[targets] = found
        return found

    state_of(frozenset([start]))
    index = 1
    while index < len(sets):
        groups: dict[int, set[int]] = {}
        for s in sets[index]:
            for classes, target in edges[s]:
                groups.setdefault(classes, set()).add(target)
        row = [DEAD] * num_classes
        if len(groups) == 1:
            ((classes, targets),) = groups.items()
            target_state = state_of(frozenset(targets))
            for c in bits_of(classes):
                row[c] = target_state
        elif groups:
            # Classes reached through the same groups share one target set.
            signature: dict[int, list[int]] = {}
            items = list(groups.items())
            for i, (classes, _) in enumerate(items):
                for c in bits_of(classes):
                    signature.setdefault(c, []).append(i)
            by_signature: dict[tuple[int, ...], int] = {}
            for c, members in signature.items():
                key = tuple(members)
                target_state = by_signature.get(key)
                if target_state is None:
                    targets = frozenset().union(*(items[i][1] for i in members))
                    target_state = by_signature[key] = state_of(targets)
                row[c] = target_state
        rows.append(row)
        index += 1
    accepting = [final in members for members in sets]
    table, accepting_kept = _pruned(rows, accepting)
    return Automaton(table[:, byte_class], accepting_kept, start=1)


def _pruned(rows: list[list[int]], accepting: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """Send states that cannot reach acceptance to DEAD, drop unreachable ones, renumber."""
    num_states = len(rows)
    preds: list[list[int]] = [[] for _ in range(num_states)]
    for source, row in enumerate(rows):
        for target in set(row):
            preds[target].append(source)
    alive = list(accepting)
    stack = [s for s in range(num_states) if alive[s]]
    while stack:
        for source in preds[stack.pop()]:
            if not alive[source]:
                alive[source] = True
                stack.append(source)
    alive[DEAD] = False
    if not alive[1]:
        raise SpecError("the spec has no instance the compiler can produce (within its bounds)")
    new_id = {DEAD: DEAD, 1: 1}
    order = [DEAD, 1]
    for state in order:  # grows while walked: a breadth-first renumbering
        for target in rows[state]:
            if alive[target] and target not in new_id:
                new_id[target] = len(order)
                order.append(target)
    table = np.array(
        [[new_id[t] if alive[t] else DEAD for t in rows[s]] for s in order], dtype=np.int32
    )
    return table, np.array([accepting[s] for s in order], dtype=bool)
