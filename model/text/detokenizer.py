"""Incremental detokenization: sampled token ids -> text deltas that never split a character."""

from __future__ import annotations

from model.text.tokenizer import Tokenizer

_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Turns one sequence's sampled tokens into text deltas, never half a UTF-8 character.

    The prefix/read offset technique: decode a short window of earlier tokens and the same
    window plus the new tokens; the new text is the difference, emitted once it does not end
    in U+FFFD (an unfinished multi-byte character). Work per token is bounded by the window.
    """

    # Prompt tokens kept as left context: decoding some tokens (e.g. SentencePiece "▁word")
    # depends on what precedes them.
    CONTEXT_TOKENS = 5
    # Tokens held back waiting for a character to complete before giving up: a UTF-8 character
    # is at most 4 bytes, so a longer run ending in U+FFFD is invalid output, not an unfinished
    # character (this bounds the window when a model emits stray bytes).
    MAX_PENDING_TOKENS = 8
    _KEEP_PENDING = 3
    _TRIM_AT = 4096

    def __init__(
        self, tokenizer: Tokenizer, prompt_ids: list[int], skip_special_tokens: bool = True
    ) -> None:
        self._decode = tokenizer.decode
        self._skip_special = skip_special_tokens
        self._skipped_ids = tokenizer.skipped_special_ids if skip_special_tokens else frozenset()
        self._ids = list(prompt_ids[-self.CONTEXT_TOKENS :])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def add(self, token_id: int) -> str:
        """Append one token; returns the newly complete text (often "", never a half character)."""
        if token_id in self._skipped_ids:
            return ""  # decodes to nothing; keeping it out of the window keeps the window short
        ids = self._ids
        ids.append(token_id)
        prefix_text = self._decode(ids[self._prefix_offset : self._read_offset], self._skip_special)
        new_text = self._decode(ids[self._prefix_offset :], self._skip_special)
        read_end = len(ids)
        if new_text.endswith(_REPLACEMENT_CHAR):
            if read_end - self._read_offset < self.MAX_PENDING_TOKENS:
                return ""
            read_end -= self._KEEP_PENDING  # the last tokens may still start a real character
            new_text = self._decode(ids[self._prefix_offset : read_end], self._skip_special)
        if len(new_text) <= len(prefix_text):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, read_end
        if self._prefix_offset >= self._TRIM_AT:  # keep the id list short on long generations
            del ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still held back at the end (an unfinished character decodes to U+FFFD)."""
        prefix_text = self._decode(
            self._ids[self._prefix_offset : self._read_offset], self._skip_special
        )
        new_text = self._decode(self._ids[self._prefix_offset :], self._skip_special)
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""
