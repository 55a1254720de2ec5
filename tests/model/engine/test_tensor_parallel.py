"""Tensor parallelism on the CPU (gloo): two ranks give the logits of one, to 1e-5 in fp32.

Tiny random Llama models with 4 KV heads (one untied with biases, one tied) are served by a
one-rank runner and by a two-rank one (rank 0 here, one spawned worker). The same batches,
prefill in chunks, decodes, a mixed batch and a prefix-cache hit, go through both paged KV
caches; the whole engine path (scheduler, runner, sampler, prompt scoring) is checked on
greedy tokens and logprobs.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.engine.config import EngineConfig
from model.engine.distributed import TPDriver
from model.engine.llm_engine import LLMEngine
from model.engine.model_runner import ModelRunner
from model.layers.attention.metadata import build_attention_metadata
from model.layers.parallel import check_tp_size, valid_tp_sizes
from model.sampling_params import SamplingParams

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
VOCAB = 256
BLOCK_SIZE = 4
SPECS = {
    "untied_bias": dict(tie_word_embeddings=False, attention_bias=True),
    "tied": dict(tie_word_embeddings=True),
}


def save_tiny_llama(path: Path, default_model_dir: Path, **overrides) -> Path:
    """A random Llama (8 heads, 4 KV heads) saved with the default model's tokenizer files."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        **overrides,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 0.1)
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(default_model_dir / name, path / name)
    return path


def engine_config(model_dir: Path, size: int) -> EngineConfig:
    return EngineConfig(
        model_dir=str(model_dir),
        device="cpu",
        tensor_parallel_size=size,
        block_size=BLOCK_SIZE,
        kv_cache_memory_bytes=1 << 20,
        num_threads=1,
    )


@pytest.fixture(scope="module", params=list(SPECS))
def engines(request, tmp_path_factory, default_model_dir):
    """(one-rank engine, rank 0 of a two-rank engine) over the same tiny model."""
    path = save_tiny_llama(
        tmp_path_factory.mktemp(request.param), default_model_dir, **SPECS[request.param]
    )
    single = LLMEngine(engine_config(path, 1))
    sharded = LLMEngine(engine_config(path, 2))
    yield single, sharded
    sharded.runner.driver.stop()


def forward_logits(
    runner: ModelRunner, batch: list[tuple[list[int], list[int], int, int]]
) -> torch.Tensor:
    """Logits of every row of one flat batch of (tokens, block table, num computed, num new),
    with the workers sent the step exactly as ModelRunner.run sends it."""
    input_ids, positions, seq_lens, query_lens, tables = [], [], [], [], []
    for tokens, table, start, n in batch:
        input_ids += tokens[start : start + n]
        positions += range(start, start + n)
        seq_lens.append(start + n)
        query_lens.append(n)
        tables.append(table)
    rows = list(range(len(input_ids)))
    if runner.driver is not None:
        runner.driver.send_step(
            runner.num_blocks, input_ids, positions, seq_lens, query_lens, tables, [], rows
        )
    meta = build_attention_metadata(seq_lens, query_lens, tables, BLOCK_SIZE, "cpu")
    with torch.inference_mode():
        hidden = runner.model(
            torch.tensor(input_ids), torch.tensor(positions), runner.kv_cache, meta
        )
        return runner.model.compute_logits(hidden[torch.tensor(rows)])


def test_sharded_logits_equal_one_rank(engines):
    single, sharded = (engine.runner for engine in engines)
    assert sharded.kv_cache.shape[4] == 2 and single.kv_cache.shape[4] == 4  # own KV heads
    assert sharded.num_blocks == single.num_blocks * 2  # the same budget, half the heads
    rng = random.Random(0)
    a = [rng.randrange(VOCAB) for _ in range(14)]
    b = [rng.randrange(VOCAB) for _ in range(9)]
    c = a[:8] + [rng.randrange(VOCAB) for _ in range(6)]  # shares a's first two blocks
    # Block ids of the pool the engine tests below never reach.
    top = single.num_blocks - 16
    tables = {
        "a": [top + i for i in (5, 1, 9, 3)],
        "b": [top + i for i in (0, 7, 11)],
        "c": [top + i for i in (5, 1, 12, 14)],
    }
    seqs = {"a": a, "b": b, "c": c}
    steps = {
        "prefill chunks": [("a", 0, 4), ("b", 0, 6)],
        "mixed": [("a", 4, 7), ("b", 6, 1)],
        "decode": [("a", 11, 1), ("b", 7, 1)],
        "prefix-cache hit": [("c", 8, 5), ("b", 8, 1)],
        "decode after hit": [("c", 13, 1), ("a", 12, 1)],
    }
    for name, step in steps.items():
        batch = [(seqs[s], tables[s], start, n) for s, start, n in step]
        want = forward_logits(single, batch)
        got = forward_logits(sharded, batch)
        assert got.shape == want.shape == (sum(n for _, _, n in step), VOCAB), name
        diff = (got - want).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs diff {diff:.2e}"


def test_engine_greedy_tokens_and_logprobs_equal_one_rank(engines):
    """Scheduler, runner (sampling and prompt-scoring rows), sampler: same tokens, logprobs."""
    rng = random.Random(1)
    prompt = [rng.randrange(3, VOCAB) for _ in range(21)]
    scored = SamplingParams(
        temperature=0.0, max_tokens=6, logprobs=5, prompt_logprobs=5, ignore_eos=True
    )
    plain = SamplingParams(temperature=0.0, max_tokens=6, logprobs=5, ignore_eos=True)
    # The scored request skips the prefix cache; the two after it hit it (shared 16 tokens).
    requests = [
        ([prompt], scored),
        ([prompt[:16] + [7, 8, 9]], plain),
        ([prompt[:16] + [10, 11], prompt[:3]], plain),
    ]
    for prompts, params in requests:
        (want, got) = (engine.generate(prompts, params) for engine in engines)
        for want_choices, got_choices in zip(want, got, strict=True):
            w, g = want_choices[0], got_choices[0]
            assert g.token_ids == w.token_ids and len(g.token_ids) == 6
            assert g.num_cached_tokens == w.num_cached_tokens
            for wl, gl in zip(w.logprobs, g.logprobs, strict=True):
                assert [t for t, _ in gl.top] == [t for t, _ in wl.top]
                assert gl.logprob == pytest.approx(wl.logprob, abs=ATOL)
            for wp, gp in zip(w.prompt_logprobs or [], g.prompt_logprobs or [], strict=True):
                assert (gp.token_id, gp.rank) == (wp.token_id, wp.rank)
                assert gp.logprob == pytest.approx(wp.logprob, abs=ATOL)
            assert (w.prompt_logprobs is None) == (params.prompt_logprobs is None)
    assert engines[1].block_manager.prefix_cache_hit_ratio > 0


def test_size_that_does_not_divide_the_kv_heads_is_refused(tmp_path, default_model_dir):
    path = save_tiny_llama(tmp_path, default_model_dir)
    with pytest.raises(ValueError) as excinfo:
        TPDriver(engine_config(path, 3))  # refused before any worker starts
    message = str(excinfo.value)
    assert "tensor_parallel_size 3" in message and "4 KV heads" in message
    assert message.endswith("sizes that work: 1, 2, 4")
    default = ModelConfig.from_dir(default_model_dir)
    assert valid_tp_sizes(default) == [1, 3]
    check_tp_size(default, 3)
