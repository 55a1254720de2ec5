"""The paged torch attention backend and its metadata builder against naive references."""

from __future__ import annotations

import random

import pytest
import torch

from model.layers.attention.backends import get_attention_backend
from model.layers.attention.metadata import AttentionMetadata, build_attention_metadata
from model.layers.attention.torch_backend import TorchAttentionBackend


def naive_slots(seq_lens, query_lens, block_tables, block_size):
    slots = []
    for seq_len, query_len, table in zip(seq_lens, query_lens, block_tables, strict=True):
        for pos in range(seq_len - query_len, seq_len):
            slots.append(table[pos // block_size] * block_size + pos % block_size)
    return slots


@pytest.mark.parametrize(
    "seq_lens, query_lens",
    [
        ([5, 9, 1, 17], [1, 1, 1, 1]),  # decode only
        ([7, 12, 3, 1], [7, 5, 1, 1]),  # prefill, extend, decodes
        ([4], [4]),
    ],
)
def test_build_attention_metadata(seq_lens, query_lens):
    block_size = 4
    rng = random.Random(0)
    pool = list(range(40))
    rng.shuffle(pool)
    block_tables = []
    for n in seq_lens:
        num_blocks = -(-n // block_size) + rng.randrange(2)  # tables may be longer than needed
        block_tables.append([pool.pop() for _ in range(num_blocks)])
    meta = build_attention_metadata(seq_lens, query_lens, block_tables, block_size, "cpu")

    assert meta.slot_mapping.dtype == torch.int64
    assert meta.slot_mapping.tolist() == naive_slots(seq_lens, query_lens, block_tables, block_size)
    assert meta.block_tables.dtype == torch.int32
    max_blocks = max(map(len, block_tables))
    assert meta.block_tables.tolist() == [t + [0] * (max_blocks - len(t)) for t in block_tables]
    assert meta.seq_lens.dtype == torch.int32 and meta.seq_lens.tolist() == seq_lens
    assert meta.query_start_loc.dtype == torch.int32
    cumulative = [0]
    for n in query_lens:
        cumulative.append(cumulative[-1] + n)
    assert meta.query_start_loc.tolist() == cumulative
    assert meta.max_query_len == max(query_lens) and meta.max_seq_len == max(seq_lens)
    assert meta.seq_lens_list == seq_lens and meta.query_lens_list == query_lens
    assert meta.block_size == block_size


def reference_attention(q, k_ctx, v_ctx, scale):
    """q: [Lq, H, d] for the last Lq positions of a context k/v: [L, KV, d]."""
    len_q, num_heads, _ = q.shape
    len_k, num_kv, _ = k_ctx.shape
    k = k_ctx.repeat_interleave(num_heads // num_kv, dim=1)
    v = v_ctx.repeat_interleave(num_heads // num_kv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
    q_pos = torch.arange(len_k - len_q, len_k)[:, None]
    scores = scores.masked_fill(torch.arange(len_k)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("num_heads, num_kv", [(4, 4), (6, 2), (4, 1)])
def test_torch_backend_matches_reference_over_steps(num_heads, num_kv):
    """Three sequences over several steps: prefill chunks, extends and decodes mixed."""
    torch.manual_seed(0)
    head_dim, block_size, num_blocks = 8, 4, 16
    scale = head_dim**-0.5
    backend = TorchAttentionBackend()
    k_cache = torch.zeros(num_blocks, block_size, num_kv, head_dim)
    v_cache = torch.zeros_like(k_cache)
    total = {"a": 13, "b": 6, "c": 3}
    ks = {n: torch.randn(t, num_kv, head_dim) for n, t in total.items()}
    vs = {n: torch.randn(t, num_kv, head_dim) for n, t in total.items()}
    qs = {n: torch.randn(t, num_heads, head_dim) for n, t in total.items()}
    ids = list(range(num_blocks))
    random.Random(1).shuffle(ids)
    tables = {"a": ids[:4], "b": ids[4:6], "c": ids[6:7]}
    steps = [
        {"a": (0, 5), "b": (0, 1)},
        {"a": (5, 4), "b": (1, 1), "c": (0, 3)},
        {"b": (2, 1), "a": (9, 1)},
        {"a": (10, 3), "b": (3, 3)},
    ]
    for step in steps:
        names = list(step)
        seq_lens = [sum(step[n]) for n in names]
        query_lens = [step[n][1] for n in names]
        meta = build_attention_metadata(
            seq_lens, query_lens, [tables[n] for n in names], block_size, "cpu"
        )
        q = torch.cat([qs[n][step[n][0] : sum(step[n])] for n in names])
        k = torch.cat([ks[n][step[n][0] : sum(step[n])] for n in names])
        v = torch.cat([vs[n][step[n][0] : sum(step[n])] for n in names])
        out = backend.forward(q, k, v, k_cache, v_cache, meta, scale)
        assert out.shape == q.shape
        for name, chunk in zip(names, out.split(query_lens), strict=True):
            start, num_new = step[name]
            ref = reference_attention(
                qs[name][start : start + num_new],
                ks[name][: start + num_new],
                vs[name][: start + num_new],
                scale,
            )
            torch.testing.assert_close(chunk, ref, atol=1e-5, rtol=1e-5)


def test_torch_backend_without_cache_does_full_prefills():
    torch.manual_seed(0)
    q, k, v = torch.randn(8, 4, 8), torch.randn(8, 2, 8), torch.randn(8, 2, 8)
    meta = build_attention_metadata([5, 1, 2], [5, 1, 2], [[0, 1], [2], [3]], 4, "cpu")
    out = TorchAttentionBackend().forward(q, k, v, None, None, meta, 0.3)
    for start, n in ((0, 5), (5, 1), (6, 2)):
        ref = reference_attention(
            q[start : start + n], k[start : start + n], v[start : start + n], 0.3
        )
        torch.testing.assert_close(out[start : start + n], ref, atol=1e-5, rtol=1e-5)


def test_get_attention_backend():
    assert isinstance(get_attention_backend("torch"), TorchAttentionBackend)
    with pytest.raises(ValueError, match="unknown attention backend"):
        get_attention_backend("nope")


def test_metadata_is_a_plain_dataclass():
    meta = build_attention_metadata([3], [1], [[2]], 4, "cpu")
    assert isinstance(meta, AttentionMetadata)
    assert meta.slot_mapping.tolist() == [2 * 4 + 2]


def test_torch_backend_without_cache_rejects_cached_prefix():
    q, k, v = torch.randn(2, 2, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    meta = build_attention_metadata([5], [2], [[0, 1]], 4, "cpu")
    with pytest.raises(AssertionError, match="cached prefix needs the KV cache"):
        TorchAttentionBackend().forward(q, k, v, None, None, meta, 0.3)


@pytest.mark.parametrize("table", [[5, 6, 7, 8], [5, 7, 6, 8], [9], [3, 2], [4, 5, 7]])
def test_a_lone_decode_reads_consecutive_blocks_in_place(table):
    """One sequence decoding: a context whose blocks are consecutive in the pool is read as a
    slice of it, any other gathered; both match the reference at every step."""
    torch.manual_seed(0)
    num_heads, num_kv, head_dim, block_size = 6, 2, 8, 4
    scale = head_dim**-0.5
    backend = TorchAttentionBackend()
    k_cache = torch.zeros(12, block_size, num_kv, head_dim)
    v_cache = torch.zeros_like(k_cache)
    total = len(table) * block_size
    ks, vs = torch.randn(2, total, num_kv, head_dim)
    qs = torch.randn(total, num_heads, head_dim)
    prompt = 2
    meta = build_attention_metadata([prompt], [prompt], [table], block_size, "cpu")
    backend.forward(qs[:prompt], ks[:prompt], vs[:prompt], k_cache, v_cache, meta, scale)
    for pos in range(prompt, total):
        meta = build_attention_metadata([pos + 1], [1], [table], block_size, "cpu")
        out = backend.forward(
            qs[pos : pos + 1], ks[pos : pos + 1], vs[pos : pos + 1], k_cache, v_cache, meta, scale
        )
        used = table[: pos // block_size + 1]
        is_consecutive = used == list(range(used[0], used[0] + len(used)))
        assert meta._plan.decode_first_slot == (used[0] * block_size if is_consecutive else None)
        ref = reference_attention(qs[pos : pos + 1], ks[: pos + 1], vs[: pos + 1], scale)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
