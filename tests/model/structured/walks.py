"""Random walks through the masks: uniformly random allowed tokens until the automaton
accepts. Shared by the tests and bench/structured_bench.py."""

from __future__ import annotations

import numpy as np

from model.structured import DEAD, CompiledGrammar


def random_walk(
    grammar: CompiledGrammar, rng: np.random.Generator, max_tokens: int
) -> tuple[bytes, bool]:
    """(the text, whether it is complete). Asserts no mask is ever a dead end."""
    automaton, masker = grammar.automaton, grammar.masker
    state, out = automaton.start, bytearray()
    for _ in range(max_tokens):
        if automaton.is_accepting(state):
            return bytes(out), True
        allowed = np.flatnonzero(masker.allowed(state))
        assert allowed.size, f"dead end after {bytes(out)!r}"
        token = int(allowed[rng.integers(allowed.size)])
        out += masker.vocab.token_bytes[token]
        state = masker.next_state(state, token)
        assert state != DEAD
    return bytes(out), automaton.is_accepting(state)
