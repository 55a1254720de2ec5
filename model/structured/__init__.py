"""Structured outputs: a spec -> a byte-level DFA -> per-state allowed-token masks.

No torch here (numpy only); masks are numpy bool arrays a sampler turns into a tensor.

Interface for the API, sampler and engine::

    vocab = VocabIndex.from_tokenizer(tokenizer)        # once per tokenizer (~1 s for 150k)
    # or VocabIndex(token_bytes: list[bytes], special_ids, vocab_size=logits_width)
    compiler = GrammarCompiler(vocab)                    # one per engine; LRU of grammars

    spec = StructuredSpec("json_schema", schema)         # or "json_object", "regex",
                                                         # "choice", "sequence"; tool_call_spec(tools)
    grammar = compiler.compile(spec)                     # raises SpecError (a ValueError with
                                                         # .param == "response_format", .keyword):
                                                         # compile in the API thread -> 400
    matcher = GrammarMatcher(grammar, eos_token_ids)     # one per sequence

    each step:  matcher.fill_mask(row)                   # bool[vocab]: allowed tokens, EOS if
                                                         # matcher.is_accepting()
                # or fill_masks(matchers, out[B, V]) for a batch (None rows: all True)
                # logits[~mask] = -inf; sample; then
                matcher.accept_token(token_id) -> bool   # False: the token was not allowed
                matcher.is_terminated()                  # only EOS may follow: finish now

What the automaton produces: compact JSON (no whitespace), properties in schema order, one
spelling per string character (json.dumps(..., ensure_ascii=False)), numbers without an
exponent once bounded. See json_schema.py for the supported keywords; anything else raises
UnsupportedKeywordError naming the keyword.

Files: nodes (tree + NFA), automaton (DFA), chars (UTF-8 classes), regex, numbers, json_values,
json_schema, spec, vocab (token trie), masks, compiler (LRU), matcher.
"""

from model.structured.automaton import DEAD, Automaton
from model.structured.compiler import CompiledGrammar, GrammarCompiler, compile_automaton
from model.structured.errors import SpecError, UnsupportedKeywordError
from model.structured.masks import TokenMasker
from model.structured.matcher import GrammarMatcher, fill_masks
from model.structured.spec import StructuredSpec, tool_call_schema, tool_call_spec
from model.structured.vocab import VocabIndex

__all__ = [
    "DEAD",
    "Automaton",
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarMatcher",
    "SpecError",
    "StructuredSpec",
    "TokenMasker",
    "UnsupportedKeywordError",
    "VocabIndex",
    "compile_automaton",
    "fill_masks",
    "tool_call_schema",
    "tool_call_spec",
]
