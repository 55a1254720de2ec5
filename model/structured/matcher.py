"""Per-sequence grammar state: the cursor the sampler and engine advance token by token."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from model.structured.automaton import DEAD
from model.structured.compiler import CompiledGrammar


class GrammarMatcher:
    """Where one sequence stands in its grammar. Per step: ``fill_mask`` (or
    ``allowed_tokens``) before sampling, ``accept_token`` after; finish when
    ``is_terminated()`` or when EOS was sampled in an accepting state."""

    def __init__(self, grammar: CompiledGrammar, eos_token_ids: Iterable[int] = ()) -> None:
        self.grammar = grammar
        self.eos_token_ids = tuple(eos_token_ids)
        self.state = grammar.automaton.start
        self.is_done = False  # EOS accepted

    def allowed_tokens(self) -> np.ndarray:
        """bool[vocab_size] of the current state, EOS excluded (read-only, cached)."""
        return self.grammar.masker.allowed(self.state)

    def fill_mask(self, out: np.ndarray) -> None:
        """Write the allowed tokens of this step into ``out`` (bool[vocab_size]), EOS ids
        included where the text so far is complete."""
        out[:] = self.grammar.masker.allowed(self.state)
        if self.is_accepting():
            out[list(self.eos_token_ids)] = True

    def accept_token(self, token_id: int) -> bool:
        """Advance by one sampled token; False (state unchanged) if it was not allowed."""
        if token_id in self.eos_token_ids:
            if not self.is_accepting():
                return False
            self.is_done = True
            return True
        state = self.grammar.masker.next_state(self.state, token_id)
        if state == DEAD:
            return False
        self.state = state
        return True

    def is_accepting(self) -> bool:
        """The text so far is a complete instance: EOS may follow."""
        return self.grammar.automaton.is_accepting(self.state)

    def is_terminated(self) -> bool:
        """Nothing but EOS may follow (or EOS was accepted): finish the sequence now."""
        return self.is_done or self.grammar.automaton.is_final(self.state)


def fill_masks(matchers: Sequence[GrammarMatcher | None], out: np.ndarray) -> None:
    """Rows of ``out`` (bool[batch, vocab_size]) for a batch: a matcher's row gets its mask, a
    None row (an unconstrained sequence) is all True."""
    for row, matcher in enumerate(matchers):
        if matcher is None:
            out[row] = True
        else:
            matcher.fill_mask(out[row])
