"""The compiled CPU decode step of one sequence (model/engine/cpu_decode.py): the same values as
the eager step, one graph for every context length and slot, and the eager step where it cannot
run or does not compile."""

from __future__ import annotations

import pytest
import torch

from model.engine.cpu_decode import CompiledLoneDecode
from model.layers.attention.metadata import build_attention_metadata
from model.layers.attention.torch_backend import is_lone_decode, lone_decode_context_slots
from model.models.loader import load_model
from tests.conftest import has_cxx_compiler

BLOCK_SIZE = 16
NUM_BLOCKS = 24
PROMPT_LEN = 37
DECODE_STEPS = 40  # crosses two block boundaries


def meta_of(seq_lens, query_lens, tables):
    return build_attention_metadata(seq_lens, query_lens, tables, BLOCK_SIZE, "cpu")


def test_lone_decodes_and_their_context_slots():
    assert is_lone_decode(meta_of([40], [1], [[3, 4, 5]]))
    assert not is_lone_decode(meta_of([40, 9], [1, 1], [[3, 4, 5], [6]]))  # two sequences
    assert not is_lone_decode(meta_of([40], [4], [[3, 4, 5]]))  # a prefill chunk
    scattered = meta_of([40], [1], [[3, 7, 5]])
    want = [b * BLOCK_SIZE + i for b in (3, 7, 5) for i in range(BLOCK_SIZE)][:40]
    assert lone_decode_context_slots(scattered).tolist() == want


@pytest.fixture(scope="module")
def int4_model(default_model_dir):
    model, _ = load_model(default_model_dir)
    if not model.quantize_for_cpu("int4"):
        pytest.skip("no int4 kernels in this torch build")
    return model


def new_pool(model) -> torch.Tensor:
    config = model.config
    shape = (config.num_hidden_layers, 2, NUM_BLOCKS, BLOCK_SIZE)
    return torch.zeros(*shape, config.num_key_value_heads, config.head_dim)


# Block tables: consecutive from block 0 (the first conversation after start), consecutive
# further on, and scattered (a conversation that shares only a cached prefix).
TABLES = {
    "from block 0": list(range(5)),
    "consecutive": list(range(9, 14)),
    "scattered": [17, 3, 20, 6, 11],
}


@pytest.fixture(scope="module")
def compiled(int4_model):
    """A CompiledLoneDecode over its own pool, and the compile counter after its warm-up."""
    from torch._dynamo.utils import counters

    if not has_cxx_compiler():
        pytest.skip("no C++ compiler for torch.compile")
    pool = new_pool(int4_model)
    lone = CompiledLoneDecode(int4_model, pool, BLOCK_SIZE)
    assert lone.compile(), "the decode step did not compile"
    assert not pool.any()  # the warm-up leaves the pool as it found it
    return lone, counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("table", TABLES)
@torch.inference_mode()
def test_compiled_steps_match_the_eager_ones_without_a_new_graph(int4_model, compiled, table):
    """A prompt prefilled eagerly, then DECODE_STEPS teacher-forced decode steps, each run by the
    compiled step on one pool and the eager step on a copy: the same hidden states and greedy
    choices, and no compile after the warm-up's, whatever the length, slot or block layout."""
    from torch._dynamo.utils import counters

    model, (lone, graphs) = int4_model, compiled
    table = TABLES[table]
    pool = lone.kv_cache
    pool.zero_()
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(100, 30000, (PROMPT_LEN + DECODE_STEPS,), generator=generator)
    assert len(table) * BLOCK_SIZE >= PROMPT_LEN + DECODE_STEPS
    prefill = meta_of([PROMPT_LEN], [PROMPT_LEN], [table])
    model(tokens[:PROMPT_LEN], torch.arange(PROMPT_LEN), pool, prefill)
    eager_pool = pool.clone()
    worst, flips = 0.0, []
    for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
        meta = meta_of([pos + 1], [1], [table])
        assert lone.can_run(meta)
        ids, positions = tokens[pos : pos + 1], torch.tensor([pos])
        got = lone.run(ids, positions, meta)
        want = model(ids, positions, eager_pool, meta_of([pos + 1], [1], [table]))
        worst = max(worst, ((got - want).abs().max() / want.abs().max()).item())
        got_logits, want_logits = model.compute_logits(got), model.compute_logits(want)
        if got_logits.argmax() != want_logits.argmax():
            top2 = want_logits.topk(2).values[0]
            flips.append((top2[0] - top2[1]).item())
    print(f"largest relative hidden-state difference {worst:.2e}; greedy flips at margins {flips}")
    assert worst < 5e-2
    assert all(margin < 0.1 for margin in flips), flips
    assert len(flips) <= 1, flips
    assert counters["stats"]["unique_graphs"] == graphs  # no recompile
    torch.testing.assert_close(pool, eager_pool, rtol=0, atol=0.3)


def test_a_step_that_does_not_compile_stays_eager(int4_model, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", fail)
    lone = CompiledLoneDecode(int4_model, new_pool(int4_model), BLOCK_SIZE)
    assert not lone.compile()
    assert not lone.can_run(meta_of([40], [1], [[3, 4, 5]]))


def test_enforce_eager_keeps_the_cpu_decode_step_eager(default_model_dir):
    from model.engine.config import EngineConfig
    from model.engine.llm_engine import LLMEngine

    config = EngineConfig(
        model_dir=str(default_model_dir),
        quantization="int4",
        enforce_eager=True,
        kv_cache_memory_bytes=64 << 20,
    )
    assert LLMEngine(config).runner.lone_decode is None
