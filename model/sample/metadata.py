"""A batch of sampling rows turned into per-step tensors (`SamplingMetadata`), and what the sampler returns."""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from model.sampling_params import SamplingParams
from model.structured import GrammarMatcher

_SEED_MASK = (1 << 64) - 1


def make_generator(seed: int | None, device: torch.device | str) -> torch.Generator | None:
    """A generator for one seeded sequence (None when unseeded); keep it for the sequence's life."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed & _SEED_MASK)
    return generator


@dataclass
class SamplingRow:
    """The sampler's state of one sequence, kept for the sequence's life.

    The token fields are read, never written: the engine passes live views of the sequence's
    own token list (model.engine.sequence.TokenView), so a sampled token is stored once.
    """

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    # Stop/EOS ids banned while len(output_token_ids) < params.min_tokens.
    stop_token_ids_for_min_tokens: Collection[int] = ()
    # Structured outputs: where this sequence stands in its grammar (the engine advances it
    # after each sampled token); None: unconstrained.
    matcher: GrammarMatcher | None = None


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # top-k alternatives, most likely first


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


def _long(values: Sequence[int], device: torch.device | None = None) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64, device=device)


def _unique_flat_index(
    token_lists: Sequence[tuple[int, Sequence[int]]], vocab_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique (row * V + token id) indices over (row, token ids) pairs and their counts (CPU).

    Ids outside the vocab are ignored. Penalties then touch only these entries, never [N, V].
    """
    flat = _long(list(itertools.chain.from_iterable(ids for _, ids in token_lists)))
    lengths = _long([len(ids) for _, ids in token_lists])
    row_ids = torch.repeat_interleave(_long([row for row, _ in token_lists]), lengths)
    keep = (flat >= 0) & (flat < vocab_size)
    return torch.unique(row_ids[keep] * vocab_size + flat[keep], return_counts=True)


@dataclass
class SamplingMetadata:
    """Per-step tensors for a batch of rows. Optional fields are None when no row needs them."""

    num_rows: int
    vocab_size: int
    is_greedy: torch.Tensor  # [N] bool
    all_greedy: bool
    any_greedy: bool
    temperature: torch.Tensor  # [N] float32, 1.0 on greedy rows
    generators: list[torch.Generator | None]
    seeded_random_rows: list[int]  # non-greedy rows with their own generator
    any_unseeded_random: bool
    num_logprobs: list[int | None]
    top_k: torch.Tensor | None = None  # [N] int64, 0 = off
    max_top_k: int = 0
    top_p_rows: torch.Tensor | None = None  # [R] int64 rows with top_p < 1; None with top_p = all
    top_p: torch.Tensor | None = None  # [R] float32
    min_p: torch.Tensor | None = None  # [N] float32
    bias_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids)
    bias_values: torch.Tensor | None = None
    min_tokens_index: tuple[torch.Tensor, torch.Tensor] | None = None  # (rows, token ids)
    repetition_index: torch.Tensor | None = None  # [S] flat row * V + id, prompt+output seen
    repetition_penalty: torch.Tensor | None = None  # [S]
    frequency_index: torch.Tensor | None = None  # [U] flat row * V + id over output tokens
    frequency_amount: torch.Tensor | None = None  # [U] freq * count + presence
    logprob_rows: torch.Tensor | None = None  # [L] int64 rows wanting logprobs
    max_num_logprobs: int = 0
    matchers: list[GrammarMatcher | None] | None = None  # per row; None: no row constrained

    @classmethod
    def build(
        cls, rows: list[SamplingRow], vocab_size: int, device: torch.device | str
    ) -> SamplingMetadata:
        assert rows, "a sampling batch needs at least one row"
        device = torch.device(device)
        params = [r.params for r in rows]
        greedy = [p.is_greedy for p in params]
        random_rows = [i for i, g in enumerate(greedy) if not g]
        meta = cls(
            num_rows=len(rows),
            vocab_size=vocab_size,
            is_greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=not random_rows,
            any_greedy=len(random_rows) < len(rows),
            temperature=torch.tensor(
                [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)],
                dtype=torch.float32,
                device=device,
            ),
            generators=[r.generator for r in rows],
            seeded_random_rows=[i for i in random_rows if rows[i].generator is not None],
            any_unseeded_random=any(rows[i].generator is None for i in random_rows),
            num_logprobs=[p.logprobs for p in params],
        )

        # Truncation only matters for rows that sample; greedy rows get neutral values.
        top_k = [
            0 if g or p.top_k >= vocab_size else max(p.top_k, 0)
            for p, g in zip(params, greedy, strict=True)
        ]
        if any(top_k):
            meta.top_k = _long(top_k, device)
            meta.max_top_k = max(top_k)
        top_p_rows = [i for i in random_rows if params[i].top_p < 1.0]
        if top_p_rows:
            if len(top_p_rows) < len(rows):
                meta.top_p_rows = _long(top_p_rows, device)
            meta.top_p = torch.tensor(
                [params[i].top_p for i in top_p_rows], dtype=torch.float32, device=device
            )
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy, strict=True)]
        if any(min_p):
            meta.min_p = torch.tensor(min_p, dtype=torch.float32, device=device)

        bias = [
            (i, t, b)
            for i, p in enumerate(params)
            if p.logit_bias
            for t, b in p.logit_bias.items()
            if t < vocab_size  # the engine rejects others at admission
        ]
        if bias:
            b_rows, b_ids, b_vals = zip(*bias, strict=True)
            meta.bias_index = (_long(b_rows, device), _long(b_ids, device))
            meta.bias_values = torch.tensor(b_vals, dtype=torch.float32, device=device)

        banned = [
            (i, t)
            for i, r in enumerate(rows)
            if len(r.output_token_ids) < r.params.min_tokens
            for t in r.stop_token_ids_for_min_tokens
            if 0 <= t < vocab_size
        ]
        if banned:
            m_rows, m_ids = zip(*banned, strict=True)
            meta.min_tokens_index = (_long(m_rows, device), _long(m_ids, device))

        meta._build_penalties(rows, device)

        if any(r.matcher is not None for r in rows):
            meta.matchers = [r.matcher for r in rows]

        lp_rows = [i for i, k in enumerate(meta.num_logprobs) if k is not None]
        if lp_rows:
            meta.logprob_rows = _long(lp_rows, device)
            meta.max_num_logprobs = min(max(meta.num_logprobs[i] for i in lp_rows), vocab_size)
        return meta

    def _build_penalties(self, rows: list[SamplingRow], device: torch.device) -> None:
        vocab_size = self.vocab_size
        rep_rows = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
        if rep_rows:
            seen = [(i, rows[i].prompt_token_ids) for i in rep_rows]
            seen += [(i, rows[i].output_token_ids) for i in rep_rows]
            index, _ = _unique_flat_index(seen, vocab_size)
            if index.numel():
                penalty = torch.tensor([r.params.repetition_penalty for r in rows])  # [N]
                self.repetition_penalty = penalty[index // vocab_size].to(device, torch.float32)
                self.repetition_index = index.to(device)
        freq_rows = [
            i
            for i, r in enumerate(rows)
            if r.params.frequency_penalty != 0.0 or r.params.presence_penalty != 0.0
        ]
        if freq_rows:
            outputs = [(i, rows[i].output_token_ids) for i in freq_rows]
            index, counts = _unique_flat_index(outputs, vocab_size)
            if index.numel():
                row_of = index // vocab_size
                freq = torch.tensor([r.params.frequency_penalty for r in rows])[row_of]
                presence = torch.tensor([r.params.presence_penalty for r in rows])[row_of]
                amount = freq * counts + presence
                self.frequency_amount = amount.to(device, torch.float32)
                self.frequency_index = index.to(device)
