"""The vocabulary as a byte trie in flat numpy arrays, built once per tokenizer.

Nodes are the distinct prefixes of the token byte strings, numbered by depth, so each level
is one contiguous run and a level-by-level walk is a few whole-array gathers (a node's state
is its parent's state advanced by its byte). Node 0 is the root (the empty prefix). Tokens
with no bytes (special tokens, whose bytes the caller leaves out) map to the root, which no
walk ever marks as allowed.

Plain nodes are the prefixes made only of PLAIN_BYTES (printable ASCII but the quote and the
backslash: the free text of a JSON string). In a state where every plain byte loops back to
the state itself, every plain node keeps that state, and a walk visits only the others
(masks.py): most of a vocabulary, inside a string, at the price of a fill.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

PLAIN_BYTES = np.array([b for b in range(0x20, 0x7F) if b not in b'"\\'], dtype=np.intp)


class VocabIndex:
    """Token id -> trie node, and the trie: per node its parent and last byte, by depth."""

    def __init__(
        self,
        token_bytes: Sequence[bytes],
        special_ids: Iterable[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        """``token_bytes[i]`` is token i's exact bytes (``Tokenizer.token_bytes(i)``); tokens
        in ``special_ids`` (EOS and other control tokens) are never allowed by a mask: the
        caller adds EOS itself where the automaton accepts. ``vocab_size`` pads the masks to
        the model's logits width (padding ids are never allowed)."""
        special = set(special_ids)
        tokens = [b"" if i in special else bytes(t) for i, t in enumerate(token_bytes)]
        if vocab_size is not None:
            assert vocab_size >= len(tokens), "vocab_size is smaller than the token list"
            tokens += [b""] * (vocab_size - len(tokens))
        self.vocab_size = len(tokens)
        prefixes = {t[:k] for t in tokens for k in range(1, len(t) + 1)}
        ordered = sorted(prefixes, key=lambda p: (len(p), p))
        node_of = {b"": 0}
        for index, prefix in enumerate(ordered, start=1):
            node_of[prefix] = index
        num_nodes = len(ordered) + 1
        # int64 (intp) throughout: numpy gathers with these indices need no conversion.
        self.parent = np.zeros(num_nodes, dtype=np.intp)
        self.parent[1:] = [node_of[p[:-1]] for p in ordered]
        self.node_byte = np.zeros(num_nodes, dtype=np.intp)
        self.node_byte[1:] = [p[-1] for p in ordered]
        depth = np.zeros(num_nodes, dtype=np.intp)
        depth[1:] = [len(p) for p in ordered]
        # level_start[k]: the first node of depth k (nodes are sorted by depth).
        self.level_start = np.searchsorted(depth, np.arange(depth[-1] + 2)).tolist()
        self.token_node = np.array([node_of[t] for t in tokens], dtype=np.intp)
        self.num_nodes = num_nodes
        self.token_bytes = tokens
        is_plain_byte = np.zeros(256, dtype=bool)
        is_plain_byte[PLAIN_BYTES] = True
        is_plain = is_plain_byte[self.node_byte]
        is_plain[0] = True
        starts = self.level_start
        for k in range(1, len(starts) - 1):
            lo, hi = starts[k], starts[k + 1]
            is_plain[lo:hi] &= is_plain[self.parent[lo:hi]]
        # Per depth, the nodes that are not plain (a walk from a plain-looping state).
        self.other_nodes = [
            np.flatnonzero(~is_plain[starts[k] : starts[k + 1]]) + starts[k]
            for k in range(len(starts) - 1)
        ]
        self.num_plain_nodes = int(is_plain.sum())
        # Nodes sorted by (depth, bytes) have nondecreasing parents, so the children of node
        # n are the ids child_start[n] .. child_start[n + 1] - 1.
        self.child_start = np.searchsorted(self.parent[1:], np.arange(num_nodes + 1)) + 1

    @classmethod
    def from_tokenizer(cls, tokenizer: object, vocab_size: int | None = None) -> VocabIndex:
        """From model.text's ``Tokenizer`` (duck-typed: ``vocab_size``, ``token_bytes(id)``,
        ``skipped_special_ids``, so this layer imports nothing of ``model.text``)."""
        size = tokenizer.vocab_size  # type: ignore[attr-defined]
        special = getattr(tokenizer, "skipped_special_ids", ())
        token_bytes = [tokenizer.token_bytes(i) for i in range(size)]  # type: ignore[attr-defined]
        return cls(token_bytes, special, vocab_size)
