"""Paged attention in Triton: the CUDA backend, a drop-in for TorchAttentionBackend.

Same pool layout and metadata as model/attention.py: a layer's `k_cache`/`v_cache` are
`[num_blocks, block_size, num_kv_heads, head_dim]` and position p of sequence b lives in slot
`block_tables[b, p // block_size] * block_size + p % block_size` of the flattened pool.

Three kernels:
- store: each new token's K/V row goes to its slot (`slot_mapping`; a slot < 0 is a padding row
  and is skipped, which the CUDA-graph runner relies on).
- decode (every sequence has one new token), flash-decoding style: stage 1 splits each context
  into `num_kv_splits` ranges, one program per (sequence, GQA group, split) that attends with the
  whole group at once so each K/V row is read once per KV head; stage 2 merges the partial
  outputs by their log-sum-exp.
- extend (anything else: prefill chunks, prefix-cache hits, decodes mixed in): varlen causal
  attention, one program per (sequence, KV head, tile of new tokens); a tile's rows are
  (token, head-in-group) pairs so the GQA group shares each K/V tile. The new K/V is stored
  first, so the cached prefix and the new tokens are both read through the block table.

CUDA-graph contract of the decode path (see model/cuda_graphs.py): it makes no host sync, reads
no python lengths from the metadata (only `q.shape[0]` and the device tensors), and its launch
grid is (num_seqs, kv_heads * head_chunks, num_kv_splits) with the split count a function of the
batch size and the device alone, never of the sequence lengths: a split past the end of its
sequence exits at once. The extend path sizes its grid from `meta.max_query_len` and runs eager.
"""

from __future__ import annotations

import functools

import torch

from model.layers.attention.metadata import AttentionMetadata
from model.layers.triton_compat import HAS_TRITON, tl, triton

LOG2E = 1.4426950408889634
MAX_KV_SPLITS = 32


def triton_available() -> bool:
    """True where the triton backend runs compiled kernels: triton importable and a CUDA GPU."""
    return HAS_TRITON and torch.cuda.is_available()


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_cache,
    V_cache,
    Slot_mapping,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_head,
    NUM_KV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_KV: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(Slot_mapping + token).to(tl.int64)
    if slot < 0:  # padding row of a CUDA-graph batch
        return
    offs_h = tl.arange(0, BLOCK_KV)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h < NUM_KV)[:, None] & (offs_d < HEAD_DIM)[None, :]
    dst = slot * stride_cache_slot + offs_h[:, None] * stride_cache_head + offs_d[None, :]
    k = tl.load(K + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    tl.store(K_cache + dst, k, mask=mask)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(V_cache + dst, v, mask=mask)


@triton.jit
def _decode_split_kernel(
    Q,
    K_cache,
    V_cache,
    Block_tables,
    Seq_lens,
    Mid_out,  # [B, H, NUM_KV_SPLITS, BLOCK_D] fp32: each split's normalised output
    Mid_lse,  # [B, H, NUM_KV_SPLITS] fp32: each split's log2-sum-exp2 of the scores
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_k_slot,
    stride_k_head,
    stride_v_slot,
    stride_v_head,
    stride_bt,
    NUM_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1) // HEAD_CHUNKS
    head_chunk = tl.program_id(1) % HEAD_CHUNKS
    split = tl.program_id(2)

    seq_len = tl.load(Seq_lens + seq)
    # Splits are whole BLOCK_N tiles so only a split's last tile is partial.
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_KV_SPLITS), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start >= end:
        return

    offs_g = head_chunk * BLOCK_H + tl.arange(0, BLOCK_H)  # heads within the group
    mask_h = offs_g < GROUP
    heads = kv_head * GROUP + offs_g
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + seq * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_h[:, None] & mask_d[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    block_row = Block_tables + seq * stride_bt
    for tile in range(start, end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        page = tl.load(block_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
        slot = page * PAGE_SIZE + offs_n % PAGE_SIZE
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            K_cache + slot[:, None] * stride_k_slot + kv_head * stride_k_head + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        scores = tl.where(mask_n[None, :], scores, float("-inf"))  # (BLOCK_H, BLOCK_N)
        # The first tile has a valid column, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V_cache + slot[:, None] * stride_v_slot + kv_head * stride_v_head + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    mid = (seq * NUM_HEADS + heads) * NUM_KV_SPLITS + split
    tl.store(
        Mid_out + mid[:, None] * BLOCK_D + offs_d[None, :],
        acc / l_i[:, None],
        mask=mask_h[:, None],
    )
    tl.store(Mid_lse + mid, m_i + tl.log2(l_i), mask=mask_h)


@triton.jit
def _decode_merge_kernel(
    Mid_out,
    Mid_lse,
    Out,
    Seq_lens,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_KV_SPLITS: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(Seq_lens + seq)
    split_len = tl.cdiv(tl.cdiv(seq_len, NUM_KV_SPLITS), BLOCK_N) * BLOCK_N
    offs_s = tl.arange(0, NUM_KV_SPLITS)
    is_used = offs_s * split_len < seq_len  # split 0 always is
    offs_d = tl.arange(0, BLOCK_D)
    mid = (seq * tl.num_programs(1) + head) * NUM_KV_SPLITS + offs_s
    lse = tl.load(Mid_lse + mid, mask=is_used, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))  # 0 for unused splits
    parts = tl.load(
        Mid_out + mid[:, None] * BLOCK_D + offs_d[None, :], mask=is_used[:, None], other=0.0
    )
    out = tl.sum(parts * weight[:, None], 0) / tl.sum(weight, 0)
    tl.store(
        Out + seq * stride_ot + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@triton.jit
def _extend_kernel(
    Q,
    K,  # the KV pool (READ_POOL) or the new tokens' K [T, n_kv, hd] (whole prompts, no cache)
    V,
    Out,
    Block_tables,
    Seq_lens,
    Query_start_loc,
    sm_scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_k_row,
    stride_k_head,
    stride_v_row,
    stride_v_head,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    READ_POOL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    BLOCK_Q: tl.constexpr = BLOCK_M // GROUP  # new tokens per program
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    first_token = tl.program_id(2) * BLOCK_Q
    q_start = tl.load(Query_start_loc + seq)
    q_len = tl.load(Query_start_loc + seq + 1) - q_start
    if first_token >= q_len:
        return
    seq_len = tl.load(Seq_lens + seq)
    prefix_len = seq_len - q_len

    # Row m of the tile is head (m % GROUP) of new token (first_token + m // GROUP).
    offs_m = tl.arange(0, BLOCK_M)
    token = first_token + offs_m // GROUP
    mask_m = (offs_m < BLOCK_Q * GROUP) & (token < q_len)
    heads = kv_head * GROUP + offs_m % GROUP
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_rows = (q_start + token).to(tl.int64)
    q = tl.load(
        Q + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    q_pos = prefix_len + token  # (BLOCK_M,) position of each row in its sequence

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Causal: this tile's last token sees positions up to prefix_len + its index.
    kv_end = tl.minimum(seq_len, prefix_len + first_token + BLOCK_Q)
    block_row = Block_tables + seq * stride_bt
    for tile in range(0, kv_end, BLOCK_N):
        offs_n = tile + tl.arange(0, BLOCK_N)
        mask_n = offs_n < kv_end
        if READ_POOL:
            page = tl.load(block_row + offs_n // PAGE_SIZE, mask=mask_n, other=0).to(tl.int64)
            kv_rows = page * PAGE_SIZE + offs_n % PAGE_SIZE
        else:
            kv_rows = (q_start + offs_n).to(tl.int64)
        mask_kv = mask_n[:, None] & mask_d[None, :]
        k = tl.load(
            K + kv_rows[:, None] * stride_k_row + kv_head * stride_k_head + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * sm_scale_log2
        is_visible = (offs_n[None, :] <= q_pos[:, None]) & mask_n[None, :]
        scores = tl.where(is_visible, scores, float("-inf"))  # (BLOCK_M, BLOCK_N)
        # Column 0 of the first tile is visible to every row, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + kv_rows[:, None] * stride_v_row + kv_head * stride_v_head + offs_d[None, :],
            mask=mask_kv,
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(
        Out + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 models stay exact on the GPU (tf32 would round the scores); 16-bit inputs ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


class TritonAttentionBackend:
    """Paged attention with Triton kernels; same contract as TorchAttentionBackend.

    The tile sizes and the split count are parameters so tests can exercise multi-tile loops on
    tiny inputs; the defaults suit head_dim 64-128 on recent NVIDIA GPUs.
    """

    name = "triton"
    supports_cuda_graphs = True  # the decode path honours the contract in the module docstring

    def __init__(
        self,
        decode_block_n: int = 64,
        decode_block_h: int = 16,
        extend_block_m: int = 64,
        extend_block_n: int = 64,
        num_kv_splits: int | None = None,
        num_warps: int = 4,
        num_stages: int = 2,
    ) -> None:
        assert HAS_TRITON, "triton is not installed"
        for value in (decode_block_n, decode_block_h, extend_block_m, extend_block_n):
            assert value > 0 and value & (value - 1) == 0, "tile sizes must be powers of two"
        assert num_kv_splits is None or 1 <= num_kv_splits <= MAX_KV_SPLITS
        self.decode_block_n = decode_block_n
        self.decode_block_h = decode_block_h
        self.extend_block_m = extend_block_m
        self.extend_block_n = extend_block_n
        self.num_kv_splits = num_kv_splits
        self.num_warps = num_warps
        self.num_stages = num_stages

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
        assert num_heads % num_kv == 0 and v.shape == k.shape == (num_tokens, num_kv, head_dim)
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
        if k_cache is None:
            assert meta.seq_lens_list == meta.query_lens_list, "a cached prefix needs the KV cache"
            self._extend(q, k, v, out, meta, scale, read_pool=False)
            return out
        assert v_cache is not None and k_cache.shape[-2:] == (num_kv, head_dim)
        assert k_cache.dtype == k.dtype and v_cache.dtype == v.dtype
        for cache in (k_cache, v_cache):  # slots must be evenly spaced in the flat view
            assert cache.stride(0) == cache.shape[1] * cache.stride(1) and cache.stride(3) == 1
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        if meta.max_query_len == 1:
            self._decode(q, k_cache, v_cache, out, meta, scale)
        else:
            self._extend(q, k_cache, v_cache, out, meta, scale, read_pool=True)
        return out

    def num_splits_for(self, num_seqs: int, num_head_programs: int, device: torch.device) -> int:
        """KV splits per decode sequence: enough programs to fill the GPU about twice.

        A function of the batch shape only, so a captured CUDA graph stays valid for any length.
        """
        if self.num_kv_splits is not None:
            return self.num_kv_splits
        if device.type != "cuda":
            return 4
        want = -(-2 * _num_sms(device.index or 0) // (num_seqs * num_head_programs))
        return min(MAX_KV_SPLITS, triton.next_power_of_2(max(want, 1)))

    def _decode(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        out: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> None:
        num_seqs, num_heads, head_dim = q.shape
        num_kv = k_cache.shape[2]
        group = num_heads // num_kv
        block_h = self.decode_block_h
        head_chunks = -(-group // block_h)
        block_d = triton.next_power_of_2(head_dim)
        num_splits = self.num_splits_for(num_seqs, num_kv * head_chunks, q.device)
        mid_out = torch.empty(
            (num_seqs, num_heads, num_splits, block_d), dtype=torch.float32, device=q.device
        )
        mid_lse = torch.empty(
            (num_seqs, num_heads, num_splits), dtype=torch.float32, device=q.device
        )
        _decode_split_kernel[(num_seqs, num_kv * head_chunks, num_splits)](
            q,
            k_cache,
            v_cache,
            meta.block_tables,
            meta.seq_lens,
            mid_out,
            mid_lse,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(1),
            v_cache.stride(2),
            meta.block_tables.stride(0),
            NUM_HEADS=num_heads,
            GROUP=group,
            HEAD_CHUNKS=head_chunks,
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_H=block_h,
            BLOCK_N=self.decode_block_n,
            PAGE_SIZE=meta.block_size,
            NUM_KV_SPLITS=num_splits,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )
        _decode_merge_kernel[(num_seqs, num_heads)](
            mid_out,
            mid_lse,
            out,
            meta.seq_lens,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=head_dim,
            BLOCK_D=block_d,
            BLOCK_N=self.decode_block_n,
            NUM_KV_SPLITS=num_splits,
            num_warps=self.num_warps,
        )

    def _extend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        read_pool: bool,
    ) -> None:
        """k/v: the pool [num_blocks, bs, n_kv, hd] if read_pool, else the new tokens [T, n_kv, hd]."""
        num_heads, head_dim = q.shape[1:]
        num_kv = k.shape[-2]
        group = num_heads // num_kv
        block_m = max(self.extend_block_m, triton.next_power_of_2(group))
        block_q = block_m // group
        num_seqs = meta.seq_lens.shape[0]
        row_dim = 1 if read_pool else 0  # the pool's slot axis / the tokens' axis
        grid = (num_seqs, num_kv, -(-meta.max_query_len // block_q))
        _extend_kernel[grid](
            q,
            k,
            v,
            out,
            meta.block_tables,
            meta.seq_lens,
            meta.query_start_loc,
            scale * LOG2E,
            q.stride(0),
            q.stride(1),
            out.stride(0),
            out.stride(1),
            k.stride(row_dim),
            k.stride(row_dim + 1),
            v.stride(row_dim),
            v.stride(row_dim + 1),
            meta.block_tables.stride(0),
            GROUP=group,
            HEAD_DIM=head_dim,
            BLOCK_D=triton.next_power_of_2(head_dim),
            BLOCK_M=block_m,
            BLOCK_N=self.extend_block_n,
            PAGE_SIZE=meta.block_size,
            READ_POOL=read_pool,
            DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=self.num_warps,
            num_stages=self.num_stages,
        )


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v [T, n_kv, hd] into the pools [num_blocks, bs, n_kv, hd] at slot_mapping [T]
    (int64; a negative slot skips its row)."""
    num_tokens, num_kv, head_dim = k.shape
    if num_tokens == 0:
        return
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(1),
        k_cache.stride(2),
        NUM_KV=num_kv,
        HEAD_DIM=head_dim,
        BLOCK_KV=triton.next_power_of_2(num_kv),
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=max(1, min(8, num_kv * head_dim // 256)),
    )
