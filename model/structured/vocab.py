"""The vocabulary as a byte trie in flat numpy arrays, built once per tokenizer.

Nodes are the distinct prefixes of the token byte strings, numbered by depth, so each level
is one contiguous run and a level-by-level walk is a few whole-array gathers (a node's state
is its parent's state advanced by its byte). Node 0 is the root (the empty prefix). Tokens with no bytes (special tokens, whose bytes the caller leaves out) map to
the root, which no walk ever marks as allowed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


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

    @classmethod
    def from_tokenizer(cls, tokenizer: object, vocab_size: int | None = None) -> VocabIndex:
        """From model.text's ``Tokenizer`` (duck-typed: ``vocab_size``, ``token_bytes(id)``,
        ``skipped_special_ids``, so this layer imports nothing of ``model.text``)."""
        size = tokenizer.vocab_size  # type: ignore[attr-defined]
        special = getattr(tokenizer, "skipped_special_ids", ())
        token_bytes = [tokenizer.token_bytes(i) for i in range(size)]  # type: ignore[attr-defined]
        return cls(token_bytes, special, vocab_size)
