"""Sampled tokens -> text deltas: per-sequence detokenization, stop strings, finish decisions.

The engine hands `process` each sequence's new token after the scheduler appended it, and
gets back the `GenerationDelta` for it; a delta with a `finish_reason` means the sequence is
done, and the engine then takes it out of the scheduler. The processor keeps only the text
state of each unfinished sequence (its detokenizer and stop-string matcher) and, for
structured outputs, advances the sequence's GrammarMatcher by each token: a grammar that
admits nothing but EOS finishes the sequence with "stop" at once. A sequence's prompt logprobs
(all computed by the time it samples or, with max_tokens 0, is scored: `finish_scored`) ride
on its first delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from model.engine.outputs import GenerationDelta
from model.engine.sequence import Sequence
from model.sample.metadata import TokenLogprobs
from model.sampling_params import SamplingParams
from model.structured import GrammarMatcher
from model.text.detokenizer import IncrementalDetokenizer
from model.text.stop_strings import StopStringMatcher
from model.text.tokenizer import Tokenizer


@dataclass(slots=True)
class _TextState:
    params: SamplingParams
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    grammar: GrammarMatcher | None
    has_emitted: bool = False  # a delta went out (it carried the prompt logprobs)


logger = logging.getLogger("nanoserve.engine")


class OutputProcessor:
    """Decides, token by token, what each sequence emits and whether it is finished."""

    def __init__(
        self, tokenizer: Tokenizer, eos_token_ids: frozenset[int], max_model_len: int
    ) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._states: dict[int, _TextState] = {}

    def add(
        self, seq: Sequence, params: SamplingParams, grammar: GrammarMatcher | None = None
    ) -> None:
        matcher = None
        if params.stop:
            matcher = StopStringMatcher(params.stop, params.include_stop_str_in_output)
        detokenizer = IncrementalDetokenizer(
            self.tokenizer, seq.prompt_token_ids, params.skip_special_tokens
        )
        self._states[seq.seq_id] = _TextState(params, detokenizer, matcher, grammar)

    def process(
        self, seq: Sequence, token_id: int, logprob: TokenLogprobs | None
    ) -> GenerationDelta:
        """The delta of `token_id`, the token just appended to `seq`."""
        state = self._states[seq.seq_id]
        params = state.params
        num_out = seq.num_output_tokens
        finish: str | None = None
        stop_reason: str | int | None = None
        text = ""
        grammar_done = False
        if state.grammar is not None:
            if not state.grammar.accept_token(token_id):
                # The sampler masks what the grammar forbids, so only a dead end gets here.
                logger.warning("seq %d: token %d outside its grammar", seq.seq_id, token_id)
                grammar_done = True
            else:
                grammar_done = state.grammar.is_terminated()
        if token_id in params.stop_token_ids and num_out >= params.min_tokens:
            finish, stop_reason = "stop", token_id
        elif (
            not params.ignore_eos
            and token_id in self.eos_token_ids
            and num_out >= params.min_tokens
        ):
            finish = "stop"
        else:
            text = state.detokenizer.add(token_id)
            if state.matcher is not None:
                text, matched = state.matcher.push(text)
                if matched is not None:
                    finish, stop_reason = "stop", matched
        if finish is None and grammar_done:
            finish = "stop"
        if finish is None and (
            num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            finish = "length"
        if finish is not None and not isinstance(stop_reason, str):
            # the end: release what the detokenizer and the stop matcher still hold back
            tail = state.detokenizer.flush()
            if state.matcher is not None:
                tail, matched = state.matcher.push(tail)
                if matched is not None:
                    finish, stop_reason = "stop", matched
                else:
                    tail += state.matcher.flush()
            text += tail
        if finish is not None:
            del self._states[seq.seq_id]
        logprobs = [logprob] if logprob is not None else None
        out = delta(seq, text, [token_id], logprobs, finish, stop_reason)
        if not state.has_emitted:
            state.has_emitted = True
            out.prompt_logprobs = seq.prompt_logprobs
        return out

    def finish_scored(self, seq: Sequence) -> GenerationDelta:
        """The one delta of a sequence that only scores its prompt (max_tokens 0)."""
        del self._states[seq.seq_id]
        out = delta(seq, "", [], None, "length", None)
        out.prompt_logprobs = seq.prompt_logprobs
        return out

    def abort(self, seq: Sequence) -> GenerationDelta:
        """The final delta of an aborted sequence; drops its text state."""
        self._states.pop(seq.seq_id, None)
        return delta(seq, "", [], None, "abort", None)


def delta(
    seq: Sequence,
    text: str,
    token_ids: list[int],
    logprobs: list[TokenLogprobs] | None,
    finish: str | None,
    stop_reason: str | int | None,
) -> GenerationDelta:
    return GenerationDelta(
        choice_index=seq.choice_index,
        text=text,
        token_ids=token_ids,
        logprobs=logprobs,
        finish_reason=finish,
        stop_reason=stop_reason,
        num_prompt_tokens=seq.num_prompt_tokens,
        num_cached_tokens=seq.num_cached_tokens,
        num_output_tokens=seq.num_output_tokens,
    )
