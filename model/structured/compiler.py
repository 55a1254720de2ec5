"""Spec -> compiled grammar, once: an LRU of automata keyed by the spec's canonical JSON, each
paired with the token masker (and its mask cache) for one vocabulary."""

from __future__ import annotations

import threading
from collections import OrderedDict

from model.structured.automaton import Automaton, compile_node
from model.structured.masks import DEFAULT_MASK_CACHE_BYTES, TokenMasker
from model.structured.spec import StructuredSpec
from model.structured.vocab import VocabIndex


class CompiledGrammar:
    """An automaton with its masker over one vocabulary; shared by every request using the
    same spec (read-only except for the mask cache)."""

    def __init__(self, automaton: Automaton, masker: TokenMasker) -> None:
        self.automaton = automaton
        self.masker = masker


def compile_automaton(spec: StructuredSpec) -> Automaton:
    """The byte automaton of ``spec`` (uncached). Raises SpecError / UnsupportedKeywordError."""
    return compile_node(spec.node())


class GrammarCompiler:
    """Compiles specs for one vocabulary, caching the last ``max_entries`` grammars.
    Thread-safe: the API thread may compile (to answer a bad spec with a 400 before
    admission) while the engine thread uses earlier grammars."""

    def __init__(
        self,
        vocab: VocabIndex,
        max_entries: int = 256,
        max_mask_cache_bytes: int = DEFAULT_MASK_CACHE_BYTES,
    ) -> None:
        self.vocab = vocab
        self.max_entries = max_entries
        self.max_mask_cache_bytes = max_mask_cache_bytes
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiled = 0

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        """The grammar of ``spec``, from the cache when the same spec was compiled before."""
        key = spec.cache_key()
        with self._lock:
            found = self._cache.get(key)
            if found is not None:
                self._cache.move_to_end(key)
                return found
        automaton = compile_automaton(spec)  # outside the lock: may take tens of ms
        grammar = CompiledGrammar(
            automaton, TokenMasker(automaton, self.vocab, self.max_mask_cache_bytes)
        )
        with self._lock:
            self.num_compiled += 1
            self._cache[key] = grammar
            self._cache.move_to_end(key)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
        return grammar
