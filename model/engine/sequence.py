"""One generation stream: the tokens of a prompt plus what was sampled after it (no torch)."""

from __future__ import annotations

import collections.abc
import enum
import itertools
import time
from typing import Any

# No per-request limit unless the engine sets one (it resolves max_tokens before admission).
UNLIMITED_TOKENS = 2**31 - 1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


class TokenView(collections.abc.Sequence[int]):
    """A live read-only window `tokens[start:stop]` (stop None: to the end) of a token list.

    The sampler reads a sequence's prompt and output through these, so each sampled token is
    stored once, in `Sequence.token_ids`, and the window grows with it.
    """

    __slots__ = ("_tokens", "_start", "_stop")

    def __init__(self, tokens: list[int], start: int, stop: int | None = None) -> None:
        self._tokens = tokens
        self._start = start
        self._stop = stop

    def __len__(self) -> int:
        end = len(self._tokens) if self._stop is None else self._stop
        return end - self._start

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._tokens[self._start : self._stop][index]
        size = len(self)
        if not -size <= index < size:
            raise IndexError("TokenView index out of range")
        return self._tokens[self._start + index % size]

    def __iter__(self) -> collections.abc.Iterator[int]:
        return itertools.islice(self._tokens, self._start, self._stop)

    def __repr__(self) -> str:
        return f"TokenView({list(self)})"


class Sequence:
    """Token ids and KV bookkeeping of one choice of one request.

    The scheduler and the block manager own `status`, `num_computed_tokens`,
    `num_cached_tokens`, `block_table`, `block_hashes` and `num_hashed_blocks`;
    the engine owns `sampling_params`, `sampling_row`, `prompt_logprobs`, `finish_reason` and
    `stop_reason`.
    `token_ids` is the one store of the prompt and the sampled tokens (the scheduler appends).
    """

    _next_id = itertools.count()

    def __init__(
        self,
        token_ids: list[int],
        *,
        request_id: str = "",
        choice_index: int = 0,
        max_tokens: int = UNLIMITED_TOKENS,
        sampling_params: Any = None,
        arrival_time: float | None = None,
    ) -> None:
        if not token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        self.seq_id: int = next(Sequence._next_id)
        self.request_id = request_id
        self.choice_index = choice_index
        self.token_ids: list[int] = list(token_ids)
        self.num_prompt_tokens: int = len(self.token_ids)
        self.max_tokens = max_tokens
        self.sampling_params = sampling_params
        # The sampler's state for this sequence (model.sample.metadata.SamplingRow, reading
        # token_ids through TokenViews); the model runner samples with it.
        self.sampling_row: Any = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = SequenceStatus.WAITING
        # Tokens whose K/V are in the cache; positions >= this are computed by later steps.
        self.num_computed_tokens = 0
        # Prompt tokens found in the prefix cache at the (last) admission.
        self.num_cached_tokens = 0
        self.block_table: list[int] = []
        # Chained hashes of this sequence's full blocks, computed once per block and kept
        # across preemptions (the tokens never change, only get appended).
        self.block_hashes: list[int] = []
        # Leading entries of block_table already offered to the prefix cache.
        self.num_hashed_blocks = 0
        self.num_preemptions = 0
        # Scoring (SamplingParams.prompt_logprobs): one entry per prompt token computed so far,
        # the first one's logprob None (nothing precedes it); None: not asked for.
        self.prompt_logprobs: list[Any] | None = None
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, "
            f"status={self.status.name}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    def prompt_view(self) -> TokenView:
        return TokenView(self.token_ids, 0, self.num_prompt_tokens)

    def output_view(self) -> TokenView:
        """The sampled tokens, live: it grows as tokens are appended."""
        return TokenView(self.token_ids, self.num_prompt_tokens)

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_prefill(self) -> bool:
        """More than one token still lacks K/V (a prompt, or a recompute after preemption)."""
        return self.num_computed_tokens < len(self.token_ids) - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Prompt logprobs are asked for and not all computed: the prompt's logits are needed,
        so its K/V cannot come from the prefix cache."""
        return (
            self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens
        )

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
