"""Allowed-token masks of automaton states: the vocabulary trie walked through the DFA.

One mask costs a walk over the trie level by level from the state: per level, each node's
state is its parent's advanced by the node's byte (two gathers over the level, no Python loop
over tokens), and the walk stops at the first level where everything is dead. From a state
that every plain byte loops on (free string text, vocab.py) only the non-plain nodes are
walked. Masks are cached per state in an LRU bounded in bytes; the masker belongs to a
compiled grammar shared by every request with the same spec, so the cache is warm across
requests.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from model.structured.automaton import DEAD, Automaton
from model.structured.vocab import PLAIN_BYTES, VocabIndex

DEFAULT_MASK_CACHE_BYTES = 64 << 20
# A sparse step costs about this many dense steps per node it visits.
SPARSE_COST = 4


class TokenMasker:
    """``allowed(state)``: bool[vocab_size], True where a token's bytes keep the automaton
    alive from ``state``. End-of-sequence is never in it; allow EOS where
    ``automaton.is_accepting(state)``."""

    def __init__(
        self,
        automaton: Automaton,
        vocab: VocabIndex,
        max_cache_bytes: int = DEFAULT_MASK_CACHE_BYTES,
    ) -> None:
        self.automaton = automaton
        self.vocab = vocab
        self.max_cached = max(1, max_cache_bytes // max(vocab.vocab_size, 1))
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.num_misses = 0
        self.num_hits = 0
        self._table: np.ndarray | None = None

    def allowed(self, state: int) -> np.ndarray:
        """The mask of ``state`` (read-only; shared with the cache)."""
        mask = self._cache.get(state)
        if mask is not None:
            self._cache.move_to_end(state)
            self.num_hits += 1
            return mask
        self.num_misses += 1
        mask = self._walk(state)
        mask.flags.writeable = False
        self._cache[state] = mask
        if len(self._cache) > self.max_cached:
            self._cache.popitem(last=False)
        return mask

    def next_state(self, state: int, token_id: int) -> int:
        """The state after ``token_id``'s bytes (``DEAD`` if the token is not allowed)."""
        data = self.vocab.token_bytes[token_id]
        return self.automaton.step(state, data) if data else DEAD

    def _walk(self, state: int) -> np.ndarray:
        if self._table is None:
            self._table = self.automaton.flat_table.astype(np.intp)
        chain = self._plain_chain(state)
        if chain is not None:
            return self._walk_others(chain, self._table)
        return self._walk_levels(state, self._table)

    def _plain_chain(self, state: int) -> list[int] | None:
        """The state at each depth of a plain path from ``state``, when every plain byte
        leads to one same state at each depth (free or length-bounded string text); None
        when the grammar tells plain bytes apart somewhere within the trie's depth."""
        table = self.automaton.table
        chain = [state]
        for _ in range(len(self.vocab.level_start) - 2):
            targets = table[state, PLAIN_BYTES]
            state = int(targets[0])
            if not (targets == state).all():
                return None
            chain.append(state)
            if state == DEAD or state == chain[-2]:
                break  # dead from here on, or a loop: the rest of the chain is this state
        return chain

    def _walk_levels(self, state: int, table: np.ndarray) -> np.ndarray:
        """Level by level: a whole level in three gathers while much of it may be alive,
        only the children of the alive nodes once few are (a sparse frontier)."""
        vocab = self.vocab
        starts = vocab.level_start
        # node_state holds state * 256 (the row offset into the flat table); 0 is DEAD.
        node_state = np.zeros(vocab.num_nodes, dtype=np.intp)
        node_state[0] = state * 256
        frontier: np.ndarray | None = None  # the alive nodes of the last level, when sparse
        for depth in range(1, len(starts) - 1):
            lo, hi = starts[depth], starts[depth + 1]
            if frontier is not None:
                first = vocab.child_start[frontier]
                counts = vocab.child_start[frontier + 1] - first
                total = int(counts.sum())
                if total == 0:
                    break
                if total * SPARSE_COST < hi - lo:
                    # The children of each frontier node are one contiguous run of ids.
                    runs = np.repeat(first - (np.cumsum(counts) - counts), counts)
                    children = np.arange(total) + runs
                    offsets = np.repeat(node_state[frontier], counts)
                    offsets += vocab.node_byte[children]
                    next_states = table[offsets]
                    alive = next_states != DEAD
                    frontier = children[alive]
                    node_state[frontier] = next_states[alive] << 8
                    if not frontier.size:
                        break
                    continue
            level = node_state[lo:hi]
            np.take(node_state, vocab.parent[lo:hi], out=level)
            level += vocab.node_byte[lo:hi]
            np.take(table, level, out=level)
            num_alive = int(np.count_nonzero(level))
            if not num_alive:  # DEAD is 0: nothing deeper can be alive
                break
            level <<= 8
            frontier = np.flatnonzero(level) + lo if num_alive * SPARSE_COST < hi - lo else None
        node_state[0] = DEAD  # tokens without bytes sit at the root
        return node_state[vocab.token_node] != DEAD

    def _walk_others(self, chain: list[int], table: np.ndarray) -> np.ndarray:
        """The walk when plain nodes of depth k all hold ``chain[k]`` (``_plain_chain``): a
        fill per level, and only the non-plain nodes are advanced."""
        vocab = self.vocab
        starts = vocab.level_start
        node_state = np.empty(vocab.num_nodes, dtype=np.intp)
        for depth in range(len(starts) - 1):
            state = chain[min(depth, len(chain) - 1)]
            node_state[starts[depth] : starts[depth + 1]] = state * 256
            nodes = vocab.other_nodes[depth]
            if depth and nodes.size:
                offsets = node_state[vocab.parent[nodes]]
                offsets += vocab.node_byte[nodes]
                next_states = table[offsets]
                next_states <<= 8
                node_state[nodes] = next_states
                if state == DEAD and not next_states.any():
                    node_state[starts[depth + 1] :] = DEAD
                    break
        node_state[0] = DEAD
        return node_state[vocab.token_node] != DEAD
