"""Per-request sampling parameters (`SamplingParams`) and the request checks that need no model.

Plain Python, no torch: the server's request parsers build `SamplingParams` directly, and a
request is checked here before any tensor exists. Every check raises
`model.errors.RequestRejected` naming its request field (`param`); the API layer turns that into
its 400 and LLMEngine.resolve_params runs the same checks for callers that skip the API. This
module owns the limits both sides share (MAX_LOGPROBS, LOGPROB_FLOOR). `model.sample` turns a
batch of parameters into tensors and samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from model.errors import RequestRejected

MAX_LOGPROBS = 20
# Logprobs of masked tokens are -inf, which JSON cannot carry; they are reported as this floor.
LOGPROB_FLOOR = -9999.0
# Temperatures below this are greedy (dividing by them would overflow).
GREEDY_TEMPERATURE = 1e-5


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int | None = None, param: str = "") -> None:
    if not is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise RequestRejected(f"{name} must be an integer {bound}, got {value!r}", param or name)


def _check_float(
    name: str, value: object, lo: float, hi: float, lo_open: bool = False, param: str = ""
) -> None:
    ok = is_number(value) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise RequestRejected(f"{name} must be a number in {bound}, got {value!r}", param or name)


def check_min_tokens(
    min_tokens: int, max_tokens: int | None, max_tokens_param: str | None = "max_tokens"
) -> None:
    """min_tokens must fit in max_tokens. `max_tokens_param` names the field that set it; None:
    max_tokens is what the context leaves for this prompt."""
    if max_tokens is None or min_tokens <= max_tokens:
        return
    if max_tokens_param is None:
        message = f"min_tokens must be <= {max_tokens} for this prompt."
    else:
        message = f"min_tokens ({min_tokens}) must be <= {max_tokens_param} ({max_tokens})."
    raise RequestRejected(message, param="min_tokens")


def check_token_ids(ids: Iterable[int], vocab_size: int, param: str) -> None:
    """Every id must be in [0, vocab_size)."""
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise RequestRejected(
            f"Token id {bad} in '{param}' is out of range [0, {vocab_size}).", param=param
        )


def check_prompt_ids(ids: list[int], vocab_size: int, param: str = "prompt") -> None:
    """A prompt is at least one token, each in [0, vocab_size)."""
    if not ids:
        raise RequestRejected("The prompt is empty.", param=param)
    check_token_ids(ids, vocab_size, param)


def resolve_max_tokens(
    num_prompt: int, max_tokens: int | None, min_tokens: int, max_model_len: int, noun: str
) -> int:
    """The completion budget: max_tokens, or the rest of the context when it is None.

    Rejects a request whose prompt and completion do not fit in `max_model_len`, naming `noun`
    ("messages" or "prompt") as the field to shorten, and a min_tokens that the rest of the
    context cannot hold (an explicit max_tokens was checked against min_tokens on construction).
    """
    if max_tokens is not None:
        if num_prompt + max_tokens > max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {max_model_len} tokens. However, you "
                f"requested {num_prompt + max_tokens} tokens ({num_prompt} in the {noun}, "
                f"{max_tokens} in the completion). Please reduce the length of the {noun} "
                "or completion.",
                param=noun,
            )
        return max_tokens
    if num_prompt >= max_model_len:
        raise RequestRejected(
            f"This model's maximum context length is {max_model_len} tokens. However, your "
            f"request has {num_prompt} input tokens. Please reduce the length of the {noun}.",
            param=noun,
        )
    budget = max_model_len - num_prompt
    check_min_tokens(min_tokens, budget, None)
    return budget


@dataclass
class SamplingParams:
    """Per-request sampling parameters; validated on construction (RequestRejected, a
    ValueError, names the field)."""

    n: int = 1
    # None = rest of the context (resolve_max_tokens); 0 = score the prompt only (no sampling)
    max_tokens: int | None = None
    temperature: float = 1.0  # 0 (or < GREEDY_TEMPERATURE) = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    logprobs: int | None = None  # None: none; 0: chosen token only; k: plus top-k alternatives
    # The same for every prompt token after the first, from the raw logits (no bias, penalties
    # or masks): what scoring a text needs. Such a sequence skips the prefix cache.
    prompt_logprobs: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    # A model.structured.CompiledGrammar the output must match (compiled by the API layer
    # before admission; this leaf module may not import model.structured, hence Any). Each
    # sequence of the request gets its own GrammarMatcher over it. Shared and read-only: kept
    # out of equality and repr.
    structured: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 0)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, -1)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise RequestRejected("logit_bias must be a dict of token id -> bias", "logit_bias")
            for token_id, bias in self.logit_bias.items():
                _check_int("logit_bias token id", token_id, 0, param="logit_bias")
                _check_float("logit_bias value", bias, -100.0, 100.0, param="logit_bias")
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()}
        if self.seed is not None and not is_int(self.seed):
            raise RequestRejected(f"seed must be an integer, got {self.seed!r}", "seed")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if self.prompt_logprobs is not None:
            _check_int("prompt_logprobs", self.prompt_logprobs, 0, MAX_LOGPROBS)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise RequestRejected("stop must be a list of non-empty strings", "stop")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, set)):
            raise RequestRejected("stop_token_ids must be a list of token ids", "stop_token_ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0)
        self.stop_token_ids = list(self.stop_token_ids)
        _check_int("min_tokens", self.min_tokens, 0)
        check_min_tokens(self.min_tokens, self.max_tokens)
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise RequestRejected(f"{name} must be a boolean", name)

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def check_token_ids(self, vocab_size: int) -> None:
        """Rejects stop_token_ids and logit_bias ids outside [0, vocab_size)."""
        check_token_ids(self.stop_token_ids, vocab_size, "stop_token_ids")
        check_token_ids(self.logit_bias or (), vocab_size, "logit_bias")
