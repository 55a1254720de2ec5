"""Paged attention over a flat batch: the torch reference backend (CPU and CUDA).

KV pool layout (allocated by the runner): `[num_layers, 2, num_blocks, block_size, num_kv_heads,
head_dim]`; a layer sees `k_cache`/`v_cache` of shape `[num_blocks, block_size, num_kv_heads,
head_dim]`. Token position p of a sequence lives in slot
`block_table[p // block_size] * block_size + p % block_size` of the flattened pool.
The pool must hold finite values (allocate it with torch.zeros): padded slots of batched decodes
are masked out of the softmax but still multiplied, and NaN * 0 is NaN.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.layers.attention.metadata import AttentionMetadata


@dataclass
class _TorchPlan:
    """Index tensors shared by all layers of one forward pass."""

    is_all_decode: bool
    has_cached_prefix: bool  # some sequence attends to tokens computed in earlier steps
    decode_rows: list[int]  # sequence indices with query_len == 1
    decode_token_index: torch.Tensor | None  # [Bd] token rows of those sequences (mixed batches)
    decode_blocks: torch.Tensor | None  # [Bd*nb] block ids covering the longest decode context
    decode_mask: torch.Tensor | None  # [Bd, 1, 1, nb*bs] bool, None when one sequence
    decode_len: int  # context length read for decodes (padded to blocks if batched)
    # One decoding sequence whose blocks are consecutive in the pool: its first slot (the
    # context is read in place, not gathered), else None.
    decode_first_slot: int | None
    prefills: list[tuple[int, int, int, int]]  # (seq index, token start, query_len, seq_len)
    prefill_blocks: dict[int, torch.Tensor]  # seq index -> block ids covering its context
    prefill_masks: dict[int, torch.Tensor]  # seq index -> [q_len, seq_len] bool causal mask


def _make_plan(meta: AttentionMetadata, device: torch.device) -> _TorchPlan:
    block_size = meta.block_size
    decode_rows = [b for b, n in enumerate(meta.query_lens_list) if n == 1]
    is_all_decode = len(decode_rows) == len(meta.query_lens_list)
    decode_token_index = decode_blocks = decode_mask = decode_first_slot = None
    decode_len = 0
    if decode_rows:
        decode_lens = [meta.seq_lens_list[b] for b in decode_rows]
        decode_len = max(decode_lens)
        num_blocks = -(-decode_len // block_size)
        if is_all_decode:
            decode_blocks = meta.block_tables[:, :num_blocks]
            if len(decode_rows) == 1:
                first, last = decode_blocks[0, [0, -1]].tolist()
                if last - first == num_blocks - 1 and (
                    num_blocks < 3 or bool((decode_blocks[0].diff() == 1).all())
                ):
                    decode_first_slot = first * block_size
        else:
            starts = list(itertools.accumulate(meta.query_lens_list, initial=0))
            rows = torch.tensor(decode_rows, dtype=torch.long, device=device)
            decode_blocks = meta.block_tables.index_select(0, rows)[:, :num_blocks]
            decode_token_index = torch.tensor(
                [starts[b] for b in decode_rows], dtype=torch.long, device=device
            )
        if len(decode_rows) > 1:
            decode_len = num_blocks * block_size
            lens = torch.tensor(decode_lens, dtype=torch.long, device=device)
            arange = torch.arange(decode_len, device=device)
            decode_mask = (arange[None, :] < lens[:, None]).view(len(decode_rows), 1, 1, decode_len)
        decode_blocks = decode_blocks.reshape(-1).long()  # (Bd*nb,)

    prefills = []
    prefill_blocks = {}
    prefill_masks = {}
    start = 0
    for b, (q_len, s_len) in enumerate(zip(meta.query_lens_list, meta.seq_lens_list, strict=True)):
        if q_len > 1:
            prefills.append((b, start, q_len, s_len))
            if s_len > q_len:  # extends a cached prefix: read the context back from the pool
                num_blocks = -(-s_len // block_size)
                prefill_blocks[b] = meta.block_tables[b, :num_blocks].long()
                q_pos = torch.arange(s_len - q_len, s_len, device=device)
                prefill_masks[b] = torch.arange(s_len, device=device)[None, :] <= q_pos[:, None]
        start += q_len
    return _TorchPlan(
        is_all_decode=is_all_decode,
        has_cached_prefix=any(
            s > q for s, q in zip(meta.seq_lens_list, meta.query_lens_list, strict=True)
        ),
        decode_rows=decode_rows,
        decode_token_index=decode_token_index,
        decode_blocks=decode_blocks,
        decode_mask=decode_mask,
        decode_len=decode_len,
        decode_first_slot=decode_first_slot,
        prefills=prefills,
        prefill_blocks=prefill_blocks,
        prefill_masks=prefill_masks,
    )


def _causal_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention of one sequence's new tokens over its context.

    q: [L_q, n_heads, hd]; k/v: [L_k, n_kv, hd]; mask: [L_q, L_k] bool (True = attend), or None
    for plain causal attention (L_q == L_k). Returns [L_q, n_heads, hd].
    """
    # 4-D with a batch of one: torch 2.13's CPU flash kernel takes only 4-D inputs, and 3-D ones
    # ran 2.5-5x slower (512 new tokens over 1,024 of context, 9 heads: 4.4 ms against 14-22).
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],  # (1, n_heads, L_q, hd)
        k.transpose(0, 1)[None],  # (1, n_kv, L_k, hd)
        v.transpose(0, 1)[None],
        attn_mask=mask,
        is_causal=mask is None,
        scale=scale,
        enable_gqa=q.shape[1] != k.shape[1],
    )
    return out[0].transpose(0, 1)


class TorchAttentionBackend:
    """Paged attention with plain torch ops; correct on CPU and CUDA."""

    name = "torch"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor | None,
        v_cache: torch.Tensor | None,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [T, n_heads, hd], k/v: [T, n_kv, hd] -> [T, n_heads, hd].

        Writes k/v into the caches at `meta.slot_mapping`, then attends causally over each
        sequence's whole context. Without caches (None) every sequence must be a full prefill.
        """
        num_tokens, num_heads, head_dim = q.shape
        num_kv = k.shape[1]
        plan = meta._plan
        if plan is None:
            plan = meta._plan = _make_plan(meta, q.device)
        if k_cache is None:
            assert not plan.has_cached_prefix, "a cached prefix needs the KV cache"
        else:
            assert v_cache is not None and k_cache.shape[-2:] == (num_kv, head_dim)
            num_slots = k_cache.shape[0] * k_cache.shape[1]
            k_cache.view(num_slots, num_kv, head_dim).index_copy_(0, meta.slot_mapping, k)
            v_cache.view(num_slots, num_kv, head_dim).index_copy_(0, meta.slot_mapping, v)

        if plan.is_all_decode:
            if k_cache is None:  # every sequence is one token long: it attends to itself only
                return v.repeat_interleave(num_heads // num_kv, dim=1)
            return self._decode(q, k_cache, v_cache, plan, scale)

        out = torch.empty_like(q)
        if plan.decode_rows:
            decode_q = q.index_select(0, plan.decode_token_index)
            if k_cache is None:
                decode_out = v.index_select(0, plan.decode_token_index)
                decode_out = decode_out.repeat_interleave(num_heads // num_kv, dim=1)
            else:
                decode_out = self._decode(decode_q, k_cache, v_cache, plan, scale)
            out.index_copy_(0, plan.decode_token_index, decode_out)
        for b, start, q_len, s_len in plan.prefills:
            end = start + q_len
            if s_len == q_len:
                ctx_k, ctx_v, mask = k[start:end], v[start:end], None
            else:
                blocks = plan.prefill_blocks[b]
                ctx_k = k_cache.index_select(0, blocks).view(-1, num_kv, head_dim)[:s_len]
                ctx_v = v_cache.index_select(0, blocks).view(-1, num_kv, head_dim)[:s_len]
                mask = plan.prefill_masks[b]
            out[start:end] = _causal_sdpa(q[start:end], ctx_k, ctx_v, mask, scale)
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        plan: _TorchPlan,
        scale: float,
    ) -> torch.Tensor:
        """One new token per sequence, all decode sequences in one SDPA call.

        The GQA group of each KV head takes the place of the query-length axis, so K/V are
        never repeated: q (Bd, n_kv, g, hd) against k (Bd, n_kv, L, hd).
        """
        num_seqs, _, head_dim = q.shape
        num_kv = k_cache.shape[2]
        ctx_len = plan.decode_len
        # index_select: several times faster than advanced indexing on CPU.
        # (Bd*nb, bs, n_kv, hd) -> (Bd, nb*bs, n_kv, hd), trimmed to the context read
        first = plan.decode_first_slot
        if first is not None:  # one sequence, its blocks consecutive: read in place
            ctx_k = k_cache.view(1, -1, num_kv, head_dim)[:, first : first + ctx_len]
            ctx_v = v_cache.view(1, -1, num_kv, head_dim)[:, first : first + ctx_len]
        else:
            blocks = plan.decode_blocks
            ctx_k = k_cache.index_select(0, blocks).view(num_seqs, -1, num_kv, head_dim)
            ctx_v = v_cache.index_select(0, blocks).view(num_seqs, -1, num_kv, head_dim)
            ctx_k, ctx_v = ctx_k[:, :ctx_len], ctx_v[:, :ctx_len]
        return _decode_sdpa(q, ctx_k, ctx_v, plan.decode_mask, scale)


def _decode_sdpa(
    q: torch.Tensor,
    ctx_k: torch.Tensor,
    ctx_v: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """q [Bd, n_heads, hd] over ctx_k/ctx_v [Bd, L, n_kv, hd] -> [Bd, n_heads, hd]."""
    num_seqs, num_heads, head_dim = q.shape
    num_kv = ctx_k.shape[2]
    out = F.scaled_dot_product_attention(
        q.reshape(num_seqs, num_kv, num_heads // num_kv, head_dim),
        ctx_k.transpose(1, 2),  # (Bd, n_kv, L, hd)
        ctx_v.transpose(1, 2),
        attn_mask=mask,
        scale=scale,
    )
    return out.view(num_seqs, num_heads, head_dim)


def is_lone_decode(meta: AttentionMetadata) -> bool:
    """Whether the step decodes one sequence (one new token over its cached context)."""
    return meta.query_lens_list == [1]


def lone_decode_context_slots(meta: AttentionMetadata) -> torch.Tensor:
    """[seq_len] the pool slots of a lone decoding sequence's context, in order."""
    block_size = meta.block_size
    ctx_len = meta.seq_lens_list[0]
    blocks = meta.block_tables[0, : -(-ctx_len // block_size)].long()
    offsets = torch.arange(block_size, device=blocks.device)
    return (blocks[:, None] * block_size + offsets).view(-1)[:ctx_len]


def lone_decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    kv_slots: torch.Tensor,
    k_base: int,
    v_base: int,
    slot: torch.Tensor,
    ctx_slots: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The torch backend's decode of one sequence, from tensors and ints only
    (LlamaForCausalLM.forward_lone_decode, which the CPU compiles).

    q: [1, n_heads, hd], k/v: [1, n_kv, hd]; kv_slots: the pool as [slots, n_kv, hd], this
    layer's K slots from k_base and V slots from v_base; slot: [1], the new token's slot within
    them; ctx_slots: [ctx_len], its context's (the new token's included). Returns
    [1, n_heads, hd].
    """
    kv_slots.index_copy_(0, slot + k_base, k)
    kv_slots.index_copy_(0, slot + v_base, v)
    ctx_k = kv_slots.index_select(0, ctx_slots + k_base).unsqueeze(0)
    ctx_v = kv_slots.index_select(0, ctx_slots + v_base).unsqueeze(0)
    return _decode_sdpa(q, ctx_k, ctx_v, None, scale)
