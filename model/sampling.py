"""Batched per-request sampling: logits processors, seeded draws and logprobs.

One `Sampler` call handles a whole batch. `SamplingMetadata.build` turns the per-request
parameters (`SamplingParams`, from model.sampling_params) into tensors once per step and records
which processors any row needs, so the common case (plain temperature sampling or greedy) runs
no penalty/bias/top-k/top-p/min-p op.

Order of operations (as in vLLM): logit_bias -> min_tokens -> repetition penalty ->
frequency/presence penalties -> [logprobs] -> greedy argmax | temperature -> top_k -> top_p ->
min_p -> draw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from model.sampling_params import SamplingParams

# Logprobs of masked tokens are -inf, which JSON cannot carry; they are reported as this floor.
LOGPROB_FLOOR = -9999.0
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
    """One sequence that samples this step. The engine keeps the generator across steps."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None = None
    # Stop/EOS ids banned while len(output_token_ids) < params.min_tokens.
    stop_token_ids_for_min_tokens: Collection[int] = ()


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


def _apply_processors_(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """logit_bias, min_tokens and penalties, in place on float32 logits (N, V)."""
    if meta.bias_index is not None:
        logits.index_put_(meta.bias_index, meta.bias_values, accumulate=True)
    if meta.min_tokens_index is not None:
        logits.index_put_(meta.min_tokens_index, torch.tensor(-math.inf, device=logits.device))
    flat = logits.view(-1)  # (N * V,)
    if meta.repetition_index is not None:
        # HF semantics: each seen token once, negative logits multiplied, others divided.
        index, penalty = meta.repetition_index, meta.repetition_penalty
        seen = flat[index]
        flat[index] = torch.where(seen < 0, seen * penalty, seen / penalty)
    if meta.frequency_index is not None:
        # OpenAI semantics over generated tokens: logit -= freq * count + presence * (count > 0).
        index = meta.frequency_index
        flat[index] = flat[index] - meta.frequency_amount


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """logit_bias, min_tokens and penalties; returns a new float32 tensor (input untouched)."""
    out = logits.to(torch.float32, copy=True)  # (N, V)
    _apply_processors_(out, meta)
    return out


def _apply_top_k_(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    # One topk over the batch at the largest k; each row reads its own k-th value.
    top_values = torch.topk(logits, max_top_k, dim=-1).values  # (N, max_k)
    kth = top_values.gather(1, (top_k.clamp(min=1) - 1).unsqueeze(1))  # (N, 1)
    kth.masked_fill_((top_k <= 0).unsqueeze(1), -math.inf)
    logits.masked_fill_(logits < kth, -math.inf)


# top_p looks for the nucleus among the most likely tokens first, widening the candidate set
# only for rows whose nucleus is larger; a full sort of the vocabulary (the last resort) is
# several times slower on CPU.
TOP_P_CANDIDATES = (256, 4096)


def _top_p_cutoffs(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[R] smallest logit of each row's nucleus: the fewest most likely tokens whose mass
    reaches top_p (the most likely token always stays; ties with the cutoff stay too)."""
    num_rows, vocab_size = logits.shape
    cutoffs = torch.empty(num_rows, dtype=logits.dtype, device=logits.device)
    log_norm = logits.logsumexp(dim=-1)  # (R,)
    rows = torch.arange(num_rows, device=logits.device)
    for num_candidates in (*TOP_P_CANDIDATES, vocab_size):
        is_last = num_candidates >= vocab_size
        sub = logits if len(rows) == num_rows else logits[rows]
        if is_last:
            values = sub.sort(dim=-1, descending=True).values  # (P, V)
        else:
            values = sub.topk(num_candidates, dim=-1).values  # (P, C) descending
        probs = (values - log_norm[rows].unsqueeze(1)).exp()  # normalised over the whole vocab
        cum_probs = probs.cumsum(dim=-1)
        p = top_p[rows].unsqueeze(1)
        # Keep a token while the mass strictly above it is < top_p: a prefix of the candidates.
        num_keep = ((cum_probs - probs) < p).sum(dim=-1).clamp(min=1)  # (P,)
        row_cutoffs = values.gather(1, (num_keep - 1).unsqueeze(1)).squeeze(1)
        if is_last:
            cutoffs[rows] = row_cutoffs
            break
        done = cum_probs[:, -1] >= p.squeeze(1)  # the nucleus lies within the candidates
        cutoffs[rows[done]] = row_cutoffs[done]
        rows = rows[~done]
        if not rows.numel():
            break
    return cutoffs


def _apply_top_p_(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    assert meta.top_p is not None
    if meta.top_p_rows is None:
        cutoffs = _top_p_cutoffs(logits, meta.top_p)
    else:
        # Rows without top_p get a -inf cutoff and stay bit-identical.
        sub_cutoffs = _top_p_cutoffs(logits[meta.top_p_rows], meta.top_p)
        cutoffs = torch.full((logits.shape[0],), -math.inf, device=logits.device)
        cutoffs.index_copy_(0, meta.top_p_rows, sub_cutoffs)
    logits.masked_fill_(logits < cutoffs.unsqueeze(1), -math.inf)


def _apply_min_p_(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    # p < min_p * p_max  <=>  logit < max_logit + log(min_p); log(0) = -inf masks nothing.
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.log().unsqueeze(1)  # (N, 1)
    logits.masked_fill_(logits < threshold, -math.inf)


class Sampler:
    """Samples one token per row. Rows without a seed share this sampler's generator.

    Keeps two [N, V] float32 work buffers between calls (fresh large allocations cost more
    than the arithmetic on CPU); not safe to call from two threads at once.
    """

    def __init__(self, seed: int | None = None) -> None:
        self._seed = seed
        self._shared_generators: dict[torch.device, torch.Generator] = {}
        self._buffers: dict[tuple[str, torch.device], torch.Tensor] = {}

    def _shared_generator(self, device: torch.device) -> torch.Generator:
        generator = self._shared_generators.get(device)
        if generator is None:
            generator = torch.Generator(device=device)
            if self._seed is None:
                generator.seed()
            else:
                generator.manual_seed(self._seed & _SEED_MASK)
            self._shared_generators[device] = generator
        return generator

    def _buffer(self, name: str, shape: torch.Size, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        buf = self._buffers.get((name, device))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=torch.float32, device=device)
            self._buffers[(name, device)] = buf
        return buf[:numel].view(shape)

    def __call__(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        assert logits.dim() == 2 and logits.shape == (meta.num_rows, meta.vocab_size), (
            f"logits {tuple(logits.shape)} vs batch ({meta.num_rows}, {meta.vocab_size})"
        )
        work = self._buffer("logits", logits.shape, logits.device).copy_(logits)  # (N, V)
        _apply_processors_(work, meta)

        # Logprobs describe the model's distribution as the request shaped it (bias, min_tokens,
        # penalties) but before temperature and truncation, which only steer the draw: this is
        # what OpenAI reports, and it keeps logprobs independent of temperature/top_p settings.
        logprobs = None
        if meta.logprob_rows is not None:
            all_rows = len(meta.logprob_rows) == meta.num_rows
            logprobs = torch.log_softmax(work if all_rows else work[meta.logprob_rows], dim=-1)

        token_ids = work.argmax(dim=-1) if meta.any_greedy else None  # (N,)
        if not meta.all_greedy:
            sampled = self._sample_(work, meta)
            token_ids = (
                sampled if token_ids is None else torch.where(meta.is_greedy, token_ids, sampled)
            )
        assert token_ids is not None

        token_list = token_ids.tolist()
        lp_list: list[TokenLogprobs | None] = [None] * meta.num_rows
        if logprobs is not None:
            lp_list = self._gather_logprobs(logprobs, token_ids, token_list, meta)
        return SamplerOutput(token_ids=token_list, logprobs=lp_list)

    def _sample_(self, logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """Draws one token per row; overwrites logits."""
        logits.div_(meta.temperature.unsqueeze(1))
        if meta.top_k is not None:
            _apply_top_k_(logits, meta.top_k, meta.max_top_k)
        if meta.top_p is not None:
            _apply_top_p_(logits, meta)
        if meta.min_p is not None:
            _apply_min_p_(logits, meta.min_p)
        # Unnormalised probabilities: the race below is invariant to a per-row scale.
        probs = logits.sub_(logits.amax(dim=-1, keepdim=True)).exp_()  # (N, V)
        # Exponential race: argmax(p / q) with q ~ Exp(1) draws from p. Each seeded row fills its
        # own q from its own generator, so its draws do not depend on the rest of the batch.
        # q = -log(u), u ~ U[0, 1): several times faster than exponential_() on CPU, and the
        # small q that decide the race come from u near 1, where u is finely resolved.
        u = self._buffer("noise", probs.shape, probs.device)
        if meta.any_unseeded_random:
            u.uniform_(generator=self._shared_generator(probs.device))
        for i in meta.seeded_random_rows:
            u[i].uniform_(generator=meta.generators[i])
        q = u.log_().neg_().clamp_(min=torch.finfo(u.dtype).tiny)  # never 0, so p=0 never wins
        return probs.div_(q).argmax(dim=-1)

    @staticmethod
    def _gather_logprobs(
        logprobs: torch.Tensor,
        token_ids: torch.Tensor,
        token_list: list[int],
        meta: SamplingMetadata,
    ) -> list[TokenLogprobs | None]:
        assert meta.logprob_rows is not None
        rows = [i for i, k in enumerate(meta.num_logprobs) if k is not None]
        chosen_ids = token_ids[meta.logprob_rows].unsqueeze(1)  # (L, 1)
        chosen_list = logprobs.gather(1, chosen_ids).squeeze(1).clamp(min=LOGPROB_FLOOR).tolist()
        top_ids: list[list[int]] = [[] for _ in rows]
        top_vals: list[list[float]] = [[] for _ in rows]
        if meta.max_num_logprobs > 0:
            values, indices = torch.topk(logprobs, meta.max_num_logprobs, dim=-1)  # (L, k), sorted
            top_vals, top_ids = values.clamp(min=LOGPROB_FLOOR).tolist(), indices.tolist()
        out: list[TokenLogprobs | None] = [None] * meta.num_rows
        for j, row in enumerate(rows):
            k = meta.num_logprobs[row]
            assert k is not None
            top = list(zip(top_ids[j][:k], top_vals[j][:k], strict=True))
            out[row] = TokenLogprobs(token_list[row], chosen_list[j], top)
        return out
