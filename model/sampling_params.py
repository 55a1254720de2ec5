"""Per-request sampling parameters (`SamplingParams`) and their validation.

Plain Python, no torch: a request's parameters are checked here on construction, before any
tensor exists. `model.sampling` turns a batch of them into tensors and samples.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20
# Temperatures below this are greedy (dividing by them would overflow).
GREEDY_TEMPERATURE = 1e-5


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_int(name: str, value: object, lo: int, hi: int | None = None) -> None:
    if not _is_int(value) or value < lo or (hi is not None and value > hi):
        bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")


def _check_float(name: str, value: object, lo: float, hi: float, lo_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bound = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise ValueError(f"{name} must be a number in {bound}, got {value!r}")


@dataclass
class SamplingParams:
    """Per-request sampling parameters; validated on construction (ValueError names the field)."""

    n: int = 1
    max_tokens: int | None = None  # None = rest of the context (the engine resolves it)
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
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        _check_int("n", self.n, 1)
        if self.max_tokens is not None:
            _check_int("max_tokens", self.max_tokens, 1)
        _check_float("temperature", self.temperature, 0.0, math.inf)
        _check_float("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        _check_int("top_k", self.top_k, -1)
        _check_float("min_p", self.min_p, 0.0, 1.0)
        _check_float("frequency_penalty", self.frequency_penalty, -2.0, 2.0)
        _check_float("presence_penalty", self.presence_penalty, -2.0, 2.0)
        _check_float("repetition_penalty", self.repetition_penalty, 0.0, math.inf, lo_open=True)
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                raise ValueError("logit_bias must be a dict of token id -> bias")
            for token_id, bias in self.logit_bias.items():
                _check_int("logit_bias token id", token_id, 0)
                _check_float("logit_bias value", bias, -100.0, 100.0)
            self.logit_bias = {t: float(b) for t, b in self.logit_bias.items()}
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, 0, MAX_LOGPROBS)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)) or not all(
            isinstance(s, str) and s for s in self.stop
        ):
            raise ValueError("stop must be a list of non-empty strings")
        self.stop = list(self.stop)
        if not isinstance(self.stop_token_ids, (list, tuple, set)):
            raise ValueError("stop_token_ids must be a list of token ids")
        for token_id in self.stop_token_ids:
            _check_int("stop_token_ids", token_id, 0)
        self.stop_token_ids = list(self.stop_token_ids)
        _check_int("min_tokens", self.min_tokens, 0)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})"
            )
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a boolean")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def check_token_ids(self, vocab_size: int) -> None:
        """Raises ValueError (naming the field) for token ids outside [0, vocab_size)."""
        if self.logit_bias and any(t >= vocab_size for t in self.logit_bias):
            raise ValueError(f"logit_bias token ids must be < {vocab_size}")
        if any(t >= vocab_size for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be < {vocab_size}")
