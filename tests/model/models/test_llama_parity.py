"""Logits parity of model/llama.py against Hugging Face transformers on tiny random models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from model.layers.attention.metadata import build_attention_metadata
from model.layers.linear import Linear
from model.models.llama import LlamaForCausalLM
from model.models.loader import load_model

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
BASE = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)
# name -> (config class name, overrides)
SPECS = {
    "llama_gqa_untied": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=2)),
    "llama_tied_bias": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=True,
            attention_bias=True,
        ),
    ),
    "llama3_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=True,
            rope_parameters=dict(
                rope_type="llama3",
                rope_theta=500000.0,
                factor=8.0,
                low_freq_factor=1.0,
                high_freq_factor=4.0,
                original_max_position_embeddings=32,
            ),
        ),
    ),
    "linear_rope": (
        "LlamaConfig",
        dict(
            num_attention_heads=4,
            num_key_value_heads=4,
            rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0),
        ),
    ),
    "mistral": (
        "MistralConfig",
        dict(num_attention_heads=4, num_key_value_heads=2, sliding_window=None),
    ),
    "qwen2_bias": ("Qwen2Config", dict(num_attention_heads=4, num_key_value_heads=2)),
    "qwen3_qk_norm": (
        "Qwen3Config",
        dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
    ),
}


def make_hf_model(spec: str, seed: int = 0):
    """A randomly initialised HF model (eager attention, eval, fp32) for one of SPECS.

    Every parameter is randomised (norm weights around 1, biases non-zero) so that each one
    matters for the logits.
    """
    config_cls_name, overrides = SPECS[spec]
    config = getattr(transformers, config_cls_name)(**BASE, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    return model.eval()


def save_hf_model(model, path: Path, **kwargs) -> Path:
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def hf_logits(model, token_ids: list[int]) -> torch.Tensor:
    """[len, vocab] float32 logits of the whole sequence."""
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


def flat_forward(
    model: LlamaForCausalLM,
    seqs: list[list[int]],
    kv_cache: torch.Tensor | None = None,
    block_size: int = 4,
) -> list[torch.Tensor]:
    """Whole prompts in one flat batch -> per-sequence [len, vocab] logits."""
    block_tables, next_block = [], 0
    for seq in seqs:
        num_blocks = -(-len(seq) // block_size)
        block_tables.append(list(range(next_block, next_block + num_blocks)))
        next_block += num_blocks
    lens = [len(seq) for seq in seqs]
    meta = build_attention_metadata(lens, lens, block_tables, block_size, "cpu")
    input_ids = torch.tensor([t for seq in seqs for t in seq])
    positions = torch.cat([torch.arange(n) for n in lens])
    with torch.inference_mode():
        logits = model.compute_logits(model(input_ids, positions, kv_cache, meta))
    return list(logits.split(lens))


def make_kv_cache(config, num_blocks: int, block_size: int, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(
        config.num_hidden_layers,
        2,
        num_blocks,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
        dtype=dtype,
    )


def pack_or_skip(model: LlamaForCausalLM) -> None:
    if not model.pack_for_cpu():
        pytest.skip("oneDNN-packed linear layers unavailable in this torch build")


@pytest.fixture(scope="module", params=[(s, w) for s in SPECS for w in ("plain", "packed")])
def model_pair(request, tmp_path_factory):
    """(spec, HF model, ours, config); "packed": ours runs from oneDNN-packed weights."""
    spec, weights = request.param
    hf_model = make_hf_model(spec)
    path = save_hf_model(hf_model, tmp_path_factory.mktemp(spec))
    ours, config = load_model(path)
    if weights == "packed":
        pack_or_skip(ours)
    return f"{spec}-{weights}", hf_model, ours, config


def test_flat_batch_logits_match_hf(model_pair):
    spec, hf_model, ours, config = model_pair
    rng = random.Random(1)
    seqs = [[rng.randrange(BASE["vocab_size"]) for _ in range(n)] for n in (1, 5, 13, 7, 40)]
    references = [hf_logits(hf_model, seq) for seq in seqs]
    kv_cache = make_kv_cache(config, num_blocks=32, block_size=4)
    for cache in (None, kv_cache):
        for ref, logits in zip(references, flat_forward(ours, seqs, cache), strict=True):
            diff = (logits - ref).abs().max().item()
            assert diff <= TOLERANCE, f"{spec}: max abs diff {diff:.2e} for len {len(ref)}"


def test_flat_batch_equals_each_alone(model_pair):
    _, _, ours, _ = model_pair
    rng = random.Random(2)
    seqs = [[rng.randrange(BASE["vocab_size"]) for _ in range(n)] for n in (3, 9, 1, 6)]
    batched = flat_forward(ours, seqs)
    for seq, logits in zip(seqs, batched, strict=True):
        (alone,) = flat_forward(ours, [seq])
        torch.testing.assert_close(logits, alone, atol=1e-5, rtol=0)


def test_chunked_prefill_and_decode_through_paged_cache(model_pair):
    """Two sequences: chunked prefill, cached-prefix extends, decodes mixed in the same steps,
    batched decodes of different lengths; shuffled blocks of 4, lengths off the block grid."""
    spec, hf_model, ours, config = model_pair
    block_size = 4
    rng = random.Random(3)
    seq_a = [rng.randrange(BASE["vocab_size"]) for _ in range(14)]  # prompt 11 + 3 decodes
    seq_b = [rng.randrange(BASE["vocab_size"]) for _ in range(9)]  # prompt 6 + 3 decodes
    block_ids = list(range(12))
    rng.shuffle(block_ids)
    tables = {"a": block_ids[:4], "b": block_ids[4:7]}
    tokens = {"a": seq_a, "b": seq_b}
    expected = {"a": hf_logits(hf_model, seq_a), "b": hf_logits(hf_model, seq_b)}
    # each step: {sequence: (num_computed_before, num_new)}
    steps = [
        {"a": (0, 4), "b": (0, 6)},
        {"a": (4, 3), "b": (6, 1)},
        {"b": (7, 1), "a": (7, 4)},
        {"a": (11, 1), "b": (8, 1)},
        {"a": (12, 1)},
        {"a": (13, 1)},
    ]
    kv_cache = make_kv_cache(config, num_blocks=12, block_size=block_size)
    for step in steps:
        names = list(step)
        seq_lens = [sum(step[n]) for n in names]
        query_lens = [step[n][1] for n in names]
        meta = build_attention_metadata(
            seq_lens, query_lens, [tables[n] for n in names], block_size, "cpu"
        )
        input_ids = torch.tensor([t for n in names for t in tokens[n][step[n][0] : sum(step[n])]])
        positions = torch.cat([torch.arange(step[n][0], sum(step[n])) for n in names])
        with torch.inference_mode():
            logits = ours.compute_logits(ours(input_ids, positions, kv_cache, meta))
        for name, chunk in zip(names, logits.split(query_lens), strict=True):
            start, num_new = step[name]
            diff = (chunk - expected[name][start : start + num_new]).abs().max().item()
            assert diff <= TOLERANCE, f"{spec}: {name} positions {start}+{num_new}: {diff:.2e}"


@pytest.mark.parametrize("weights", ["plain", "packed"])
def test_bf16_model_close_to_hf_bf16(tmp_path, weights):
    hf_model = make_hf_model("qwen3_qk_norm")
    path = save_hf_model(hf_model, tmp_path / "m")
    ours, config = load_model(path, dtype=torch.bfloat16)
    if weights == "packed":
        pack_or_skip(ours)
    assert ours.model.embed_tokens.weight.dtype == torch.bfloat16
    seq = list(range(3, 40, 3))
    (logits,) = flat_forward(ours, [seq], make_kv_cache(config, 8, 4, torch.bfloat16))
    assert logits.dtype == torch.float32
    reference = hf_logits(hf_model.to(torch.bfloat16), seq)
    assert (logits - reference).abs().max().item() < 0.1


def test_packed_model_holds_no_plain_projection_weights(model_pair):
    spec, _, ours, _ = model_pair
    if not spec.endswith("-packed"):
        pytest.skip("plain weights")
    linears = [m for m in ours.modules() if isinstance(m, Linear)]
    assert linears and all(m.weight is None and m.packed_weight is not None for m in linears)
    assert ours.lm_head_packed is not None
    assert ours.model.embed_tokens.weight.numel()  # the lookup still needs the embeddings
