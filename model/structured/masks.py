"""Allowed-token masks of automaton states: the vocabulary trie walked through the DFA.

One mask costs a walk over the trie level by level from the state: per level, each node's
state is its parent's advanced by the node's byte (two gathers over the level, no Python loop
over tokens), and the walk stops at the first level where everything is dead. Masks are cached per state in
an LRU bounded in bytes; the masker belongs to a compiled grammar shared by every request with
the same spec, so the cache is warm across requests.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np

from model.structured.automaton import DEAD, Automaton
from model.structured.vocab import VocabIndex

DEFAULT_MASK_CACHE_BYTES = 64 << 20


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
        vocab = self.vocab
        if self._table is None:
            self._table = self.automaton.flat_table.astype(np.intp)
        table = self._table
        # node_state holds state * 256 (the row offset into the flat table) for each node.
        node_state = np.empty(vocab.num_nodes, dtype=np.intp)
        node_state[0] = state * 256
        starts = vocab.level_start
        for depth in range(1, len(starts) - 1):
            level = node_state[starts[depth] : starts[depth + 1]]
            np.take(node_state, vocab.parent[starts[depth] : starts[depth + 1]], out=level)
            level += vocab.node_byte[starts[depth] : starts[depth + 1]]
            np.take(table, level, out=level)
            if not level.any():  # DEAD is 0: nothing deeper can be alive
                node_state[starts[depth + 1] :] = DEAD
                break
            level <<= 8
        node_state[0] = DEAD  # tokens without bytes sit at the root
        return node_state[vocab.token_node] != DEAD
