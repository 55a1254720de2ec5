"""TritonAttentionBackend against TorchAttentionBackend on random paged layouts.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, fp32, tiny
shapes); with one they are compiled and also checked in bf16/fp16 at realistic tile sizes.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch

from model.layers.attention.metadata import AttentionMetadata, build_attention_metadata
from model.layers.attention.torch_backend import TorchAttentionBackend

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
# Tiles small enough that tiny sequences still span several of them (tl.dot needs >= 16 on GPUs).
SMALL_TILES = dict(decode_block_n=16, extend_block_m=16, extend_block_n=16)
FP32_TOL = 5e-5 if HAS_CUDA else 1e-5  # summation order differs from the reference SDPA
if not HAS_CUDA:
    SMALL_TILES = dict(decode_block_n=8, decode_block_h=4, extend_block_m=16, extend_block_n=8)


def load_triton_module(name: str):
    """Import a module holding triton kernels; on the CPU make sure they are interpreted.

    The interpreter is chosen when a kernel is decorated, so the variable must be set before the
    import; a module imported earlier without it is reloaded.
    """
    if HAS_CUDA:
        return importlib.import_module(name)
    os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module(name)
    if type(getattr(module, "_store_kv_kernel", None)).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


@pytest.fixture(scope="module")
def triton_attention():
    return load_triton_module("model.layers.attention.triton_backend")


def make_case(
    seq_lens: list[int],
    query_lens: list[int],
    block_size: int,
    num_heads: int,
    num_kv: int,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Random q/k/v (strided views of one fused tensor, as the model makes them), a pool full of
    random values (the cached prefixes) and shuffled, over-long block tables."""
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) + (b % 2) for b, n in enumerate(seq_lens)]
    num_blocks = sum(blocks_per_seq) + 3
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    block_tables = []
    for n in blocks_per_seq:
        block_tables.append(perm[:n])
        perm = perm[n:]
    pool_shape = (num_blocks, block_size, num_kv, head_dim)
    k_cache = torch.randn(pool_shape, generator=gen).to(DEVICE, dtype)
    v_cache = torch.randn(pool_shape, generator=gen).to(DEVICE, dtype)
    num_tokens = sum(query_lens)
    qkv = torch.randn(num_tokens, num_heads + 2 * num_kv, head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([num_heads, num_kv, num_kv], dim=1)  # (T, heads, hd) strided views
    return q, k, v, k_cache, v_cache, (seq_lens, query_lens, block_tables, block_size)


def compare(backend, q, k, v, k_cache, v_cache, layout, use_cache=True):
    """Run both backends on copies of the pool; returns (max abs diff, reference, output)."""
    scale = q.shape[-1] ** -0.5
    ref_caches = (k_cache.clone(), v_cache.clone()) if use_cache else (None, None)
    tri_caches = (k_cache.clone(), v_cache.clone()) if use_cache else (None, None)
    ref = TorchAttentionBackend().forward(
        q, k, v, *ref_caches, build_attention_metadata(*layout, DEVICE), scale
    )
    out = backend.forward(q, k, v, *tri_caches, build_attention_metadata(*layout, DEVICE), scale)
    if use_cache:  # the store kernel writes exactly what index_copy_ writes
        assert torch.equal(tri_caches[0], ref_caches[0])
        assert torch.equal(tri_caches[1], ref_caches[1])
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all()
    return (out.float() - ref.float()).abs().max().item(), ref, out


SCENARIOS = {
    # name: (seq_lens, query_lens)
    "decode": ([1, 7, 16, 33, 20], [1, 1, 1, 1, 1]),
    "prefill": ([5, 17, 1, 12], [5, 17, 1, 12]),
    "prefix_hit_extend": ([19, 40, 9], [3, 24, 9]),
    "mixed": ([13, 30, 7, 25], [1, 14, 7, 1]),
}
GQA = [(2, 2), (6, 2), (8, 2)]  # (heads, kv heads): group sizes 1, 3, 4


# Every scenario with every GQA ratio at block size 8, and with one of them at block size 16.
CASES = [(8, *gqa) for gqa in GQA] + [(16, *GQA[1])]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("block_size, num_heads, num_kv", CASES)
def test_matches_torch_backend(triton_attention, scenario, num_heads, num_kv, block_size):
    seq_lens, query_lens = SCENARIOS[scenario]
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES)
    case = make_case(seq_lens, query_lens, block_size, num_heads, num_kv)
    diff, _, _ = compare(backend, *case)
    assert diff < FP32_TOL


@pytest.mark.slow
@pytest.mark.parametrize("num_heads, num_kv", [(9, 3), (32, 8)])  # SmolLM2 and Llama-3-8B groups
def test_default_tiles_realistic_heads(triton_attention, num_heads, num_kv):
    """The production tile sizes (64-wide, 16-head decode tiles) with head_dim 64."""
    backend = triton_attention.TritonAttentionBackend()
    scenarios = list(SCENARIOS.values()) + [([300, 77, 150], [1, 77, 40])]
    for seq_lens, query_lens in scenarios:
        case = make_case(seq_lens, query_lens, 16, num_heads, num_kv, head_dim=64)
        diff, _, _ = compare(backend, *case)
        assert diff < FP32_TOL


def test_without_cache_full_prompts(triton_attention):
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES)
    case = make_case([9, 1, 20], [9, 1, 20], 8, 6, 2)
    diff, _, _ = compare(backend, *case, use_cache=False)
    assert diff < FP32_TOL


def test_non_power_of_two_head_dim(triton_attention):
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES)
    for seq_lens, query_lens in (SCENARIOS["mixed"], SCENARIOS["decode"]):
        case = make_case(seq_lens, query_lens, 8, 6, 2, head_dim=24, seed=1)
        diff, _, _ = compare(backend, *case)
        assert diff < FP32_TOL


@pytest.mark.parametrize("num_kv_splits", [1, 2, 32])
def test_decode_split_counts(triton_attention, num_kv_splits):
    """One split, some, and more splits than tiles (most of them empty) agree."""
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES, num_kv_splits=num_kv_splits)
    case = make_case([3, 50, 17], [1, 1, 1], 16, 4, 1, seed=2)
    diff, _, _ = compare(backend, *case)
    assert diff < FP32_TOL


def test_decode_group_wider_than_head_tile(triton_attention):
    """A GQA group larger than decode_block_h is spread over several programs."""
    tiles = dict(SMALL_TILES, decode_block_h=16 if HAS_CUDA else 2)
    backend = triton_attention.TritonAttentionBackend(**tiles)
    num_heads = 40 if HAS_CUDA else 5
    case = make_case([6, 21], [1, 1], 8, num_heads, 1, seed=3)
    diff, _, _ = compare(backend, *case)
    assert diff < FP32_TOL


def test_padding_rows_are_not_stored(triton_attention):
    """Slot -1 (CUDA-graph padding) writes nothing; the row still yields finite output."""
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES)
    q, k, v, k_cache, v_cache, layout = make_case([5, 9], [1, 1], 8, 4, 2, seed=4)
    meta = build_attention_metadata(*layout, DEVICE)
    meta.slot_mapping[1] = -1
    k_before, v_before = k_cache.clone(), v_cache.clone()
    out = backend.forward(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.isfinite(out).all()
    slot0 = meta.slot_mapping[0].item()
    k_flat, v_flat = k_cache.view(-1, 2, 16), v_cache.view(-1, 2, 16)
    assert torch.equal(k_flat[slot0], k[0]) and torch.equal(v_flat[slot0], v[0])
    k_flat[slot0], v_flat[slot0] = k_before.view(-1, 2, 16)[slot0], v_before.view(-1, 2, 16)[slot0]
    assert torch.equal(k_cache, k_before) and torch.equal(v_cache, v_before)


def test_split_count_depends_on_batch_shape_only(triton_attention):
    """Splits come from (num_seqs, head programs, device): a captured grid fits any length."""
    module = triton_attention
    assert module.TritonAttentionBackend(num_kv_splits=8).num_splits_for(3, 2, DEVICE) == 8
    if HAS_CUDA:
        backend = module.TritonAttentionBackend()
        cuda = torch.device("cuda")
        splits = [backend.num_splits_for(b, 8, cuda) for b in (1, 4, 64, 512)]
        assert splits == sorted(splits, reverse=True) and splits[-1] >= 1
        assert all(n & (n - 1) == 0 and n <= module.MAX_KV_SPLITS for n in splits)


def test_triton_available_matches_device(triton_attention):
    assert triton_attention.triton_available() == HAS_CUDA


def test_decode_graph_runner_pads_batches(triton_attention):
    """The static-buffer path of the CUDA-graph runner (eager on the CPU): a batch of 3 padded
    to 4 gives the rows of an unpadded eager step and leaves the pool as the torch backend does."""
    from model.config import ModelConfig
    from model.engine.cuda_graphs import DecodeGraphRunner, decode_batch_sizes
    from model.models.llama import LlamaForCausalLM

    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        rope_scaling=None,
        max_position_embeddings=128,
        tie_word_embeddings=True,
        attention_bias=False,
        qk_norm=False,
        torch_dtype="float32",
        bos_token_id=None,
        eos_token_id=None,
    )
    torch.manual_seed(0)
    backend = triton_attention.TritonAttentionBackend(**SMALL_TILES)
    model = LlamaForCausalLM(config, backend).to(DEVICE).eval()
    model.init_rope_cache()
    block_size, num_blocks = 8, 12
    kv_cache = torch.randn(2, 2, num_blocks, block_size, 2, 16, device=DEVICE)
    seq_lens = [5, 17, 9]
    block_tables = [[3], [7, 1, 10], [0, 5]]
    meta = build_attention_metadata(seq_lens, [1, 1, 1], block_tables, block_size, DEVICE)
    input_ids = torch.tensor([4, 60, 33], device=DEVICE)
    positions = torch.tensor([n - 1 for n in seq_lens], device=DEVICE)

    graph_cache = kv_cache.clone()  # a captured graph is bound to its pool
    runner = DecodeGraphRunner(
        model, graph_cache, max_batch_size=4, max_blocks_per_seq=4, block_size=block_size
    )
    assert runner.batch_sizes == decode_batch_sizes(4) == [1, 2, 4]
    assert runner.padded_batch_size(3) == 4 and runner.can_run(meta)
    prefill = build_attention_metadata([3, 4], [3, 1], [[0], [1]], block_size, DEVICE)
    assert not runner.can_run(prefill)
    runner.capture()  # graphs on a GPU; on the CPU only the static metadata
    assert torch.equal(graph_cache, kv_cache)  # capturing stores nothing
    with torch.inference_mode():
        hidden = runner.run(input_ids, positions, meta).clone()
        eager_cache = kv_cache.clone()
        eager = model(input_ids, positions, eager_cache, meta)
        for layer in model.model.layers:
            layer.self_attn.attn_backend = TorchAttentionBackend()
        torch_cache = kv_cache.clone()
        reference = model(input_ids, positions, torch_cache, meta)
    assert hidden.shape == (3, 32)
    # Padding changes the matmul blocking, so agreement is to rounding, not bitwise.
    assert (hidden - eager).abs().max().item() < FP32_TOL
    assert (hidden - reference).abs().max().item() < 10 * FP32_TOL
    assert (graph_cache - eager_cache).abs().max().item() < FP32_TOL
    assert (graph_cache - torch_cache).abs().max().item() < FP32_TOL


def test_decode_batch_sizes_ladder():
    from model.engine.cuda_graphs import decode_batch_sizes

    assert decode_batch_sizes(1) == [1]
    assert decode_batch_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert decode_batch_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert decode_batch_sizes(256)[-3:] == [224, 240, 256]


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("scenario", list(SCENARIOS) + ["long"])
def test_half_precision_on_gpu(triton_attention, dtype, head_dim, scenario):
    if scenario == "long":
        seq_lens, query_lens = [1000, 517, 2048, 64, 300], [1, 1, 1, 64, 300]
    else:
        seq_lens, query_lens = SCENARIOS[scenario]
    for tiles in ({}, SMALL_TILES):
        backend = triton_attention.TritonAttentionBackend(**tiles)
        for num_heads, num_kv in ((32, 8), (9, 3), (16, 16)):
            case = make_case(seq_lens, query_lens, 16, num_heads, num_kv, head_dim, dtype)
            diff, _, _ = compare(backend, *case)
            assert diff < 2e-2, (tiles, num_heads, num_kv, diff)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_decode_is_graph_capturable(triton_attention):
    """A decode captured at one set of lengths replays correctly after the sequences grew."""
    backend = triton_attention.TritonAttentionBackend()
    q, k, v, k_cache, v_cache, layout = make_case([30, 70], [1, 1], 16, 8, 2, 64, torch.bfloat16)
    _, _, block_tables, block_size = layout
    early = build_attention_metadata([9, 40], [1, 1], block_tables, block_size, DEVICE)
    late = build_attention_metadata([30, 70], [1, 1], block_tables, block_size, DEVICE)
    static = AttentionMetadata(
        slot_mapping=early.slot_mapping.clone(),
        block_tables=early.block_tables.clone(),
        seq_lens=early.seq_lens.clone(),
        query_start_loc=early.query_start_loc.clone(),
        max_query_len=1,
        max_seq_len=early.max_seq_len,
        seq_lens_list=early.seq_lens_list,
        query_lens_list=early.query_lens_list,
        block_size=block_size,
    )
    static_q, static_k, static_v = q.clone(), k.clone(), v.clone()
    backend.forward(static_q, static_k, static_v, k_cache, v_cache, static, 0.125)  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = backend.forward(static_q, static_k, static_v, k_cache, v_cache, static, 0.125)

    static.slot_mapping.copy_(late.slot_mapping)
    static.seq_lens.copy_(late.seq_lens)
    for static_t, t in ((static_q, q), (static_k, k), (static_v, v)):
        static_t.copy_(torch.randn_like(t))
    ref_caches = (k_cache.clone(), v_cache.clone())
    graph.replay()
    ref = TorchAttentionBackend().forward(static_q, static_k, static_v, *ref_caches, late, 0.125)
    assert torch.equal(k_cache, ref_caches[0]) and torch.equal(v_cache, ref_caches[1])
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
