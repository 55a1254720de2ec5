"""The engine against HF transformers on the default model: batching, preemption, prefix cache."""

from __future__ import annotations

import pytest
import torch

from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.sampling_params import SamplingParams

NUM_NEW_TOKENS = 24

QUESTIONS = [
    "What is the capital of France?",
    "Name three colors.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "Explain gravity in one sentence.",
    "List two fruits that are red.",
    "What language is spoken in Brazil?",
    "How many legs does a spider have?",
    "Translate 'good morning' into Spanish.",
    "What is the boiling point of water in Celsius?",
    "Suggest a name for a pet turtle.",
    "What is the largest planet in our solar system?",
    "Describe a cat in five words.",
    "Why is the sky blue? Answer briefly, please, in a way a child would understand.",
]


@pytest.fixture(scope="module")
def engine(default_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(default_model_dir), device="cpu"))


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [
        tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS
    ]


@pytest.fixture(scope="module")
def hf_outputs(default_model_dir, prompts) -> list[list[int]]:
    """Greedy continuation of each prompt alone by HF transformers."""
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        default_model_dir, dtype=torch.float32
    ).eval()
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NUM_NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(gen[0, len(p) :].tolist())
    return outs


def greedy(max_tokens=NUM_NEW_TOKENS, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def run_staggered(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    """Adds one request per step, so prefills land in the middle of running decodes."""
    tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
    pending = list(enumerate(prompts))
    while pending or engine.has_unfinished():
        if pending:
            i, p = pending.pop(0)
            engine.add_request(f"r{i}", p, greedy())
        for rid, delta in engine.step():
            assert not isinstance(delta, Exception), delta
            tokens[rid].extend(delta.token_ids)
    return [tokens[f"r{i}"] for i in range(len(prompts))]


def test_staggered_batch_matches_hf(engine, prompts, hf_outputs):
    free_before = engine.block_manager.num_free_blocks
    got = run_staggered(engine, prompts)
    for i, (ours, ref) in enumerate(zip(got, hf_outputs, strict=True)):
        assert ours == ref, f"prompt {i}: {QUESTIONS[i]!r}"
    assert engine.block_manager.usage == 0.0
    assert engine.block_manager.num_free_blocks >= free_before - 0  # cached blocks count as free


def test_preemption_keeps_outputs_exact(default_model_dir, prompts, hf_outputs):
    # 24 blocks of 16 tokens hold ~6 sequences: 16 requests must take turns through preemption.
    small = LLMEngine(
        EngineConfig(
            model_dir=str(default_model_dir),
            device="cpu",
            max_model_len=256,
            kv_cache_memory_bytes=24 * 16 * 30 * 2 * 3 * 64 * 4,
            max_num_batched_tokens=256,
        )
    )
    assert small.block_manager.num_blocks == 24
    got = run_staggered(small, prompts)
    assert small.num_preemptions_total > 0
    for i, (ours, ref) in enumerate(zip(got, hf_outputs, strict=True)):
        assert ours == ref, f"prompt {i}: {QUESTIONS[i]!r}"
    assert small.block_manager.usage == 0.0


def test_abort_returns_blocks(engine, prompts):
    free_before = engine.block_manager.num_free_blocks
    engine.add_request("a", prompts[0], greedy(max_tokens=50))
    engine.add_request("b", prompts[1], greedy(max_tokens=50))
    for _ in range(5):
        engine.step()
    assert engine.block_manager.usage > 0
    finals = engine.abort_request("a") + engine.abort_request("b")
    assert [d.finish_reason for _, d in finals] == ["abort", "abort"]
    assert engine.block_manager.usage == 0.0
    assert engine.block_manager.num_free_blocks == free_before
    assert not engine.has_unfinished()


def test_shared_prefix_is_cached(engine):
    tok = engine.tokenizer
    base = tok.encode("The quick brown fox jumps over the lazy dog. " * 100)[:1000]
    assert len(base) == 1000
    first = engine.generate([base + tok.encode(" First")], greedy(max_tokens=2))[0][0]
    assert first.num_cached_tokens < 1000
    computed_before = engine.prompt_tokens_total
    second = engine.generate([base + tok.encode(" Second one")], greedy(max_tokens=2))[0][0]
    block = engine.config.block_size
    assert second.num_cached_tokens == 1000 // block * block
    num_prompt = second.num_prompt_tokens
    assert engine.prompt_tokens_total - computed_before == num_prompt - second.num_cached_tokens


def test_seeded_request_same_alone_and_in_batch(engine, prompts):
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = engine.generate([prompts[3]], seeded)[0][0].token_ids
    busy = [SamplingParams(temperature=0.8, max_tokens=20, ignore_eos=True)] * 5
    outs = engine.generate(prompts[:5] + [prompts[3]], busy + [seeded])
    assert outs[-1][0].token_ids == alone
    unseeded = engine.generate(
        [prompts[3]] * 2, SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    )
    assert len(unseeded) == 2


def test_n_choices_share_the_prompt(engine, prompts):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    out = engine.generate([prompts[2]], params)[0]
    assert sorted(d.choice_index for d in out) == [0, 1, 2]
    assert all(len(d.token_ids) == 8 and d.finish_reason == "length" for d in out)
    block = engine.config.block_size
    # siblings start after the first choice's prompt is cached
    assert max(d.num_cached_tokens for d in out) >= (len(prompts[2]) - 1) // block * block


def test_stop_string_and_eos(engine, prompts):
    text_out = engine.generate([prompts[0]], greedy(max_tokens=30))[0][0]
    full = text_out.text
    assert "Paris" in full
    stop = "Paris"
    cut = engine.generate([prompts[0]], greedy(max_tokens=30, stop=[stop]))[0][0]
    assert cut.finish_reason == "stop" and cut.stop_reason == stop
    assert cut.text == full[: full.index(stop)]
    natural = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=200))[0][0]
    assert natural.finish_reason == "stop" and natural.stop_reason is None


def test_no_per_request_state_outlives_its_request(engine, prompts):
    """Finished, stopped, aborted and n > 1 requests leave nothing behind (leak check)."""
    engine.add_request("done", prompts[0], greedy(max_tokens=3))
    engine.add_request("stopped", prompts[1], SamplingParams(max_tokens=40, stop=["e"], seed=1))
    engine.add_request("aborted", prompts[2], greedy(max_tokens=50))
    engine.add_request("siblings", prompts[3], SamplingParams(n=3, max_tokens=4, seed=2))
    engine.step()
    engine.abort_request("aborted")
    while engine.has_unfinished():
        engine.step()
    assert engine._requests == {}
    assert engine.output_processor._states == {}
    assert engine.scheduler._by_request == {} and engine.scheduler.running == {}
    assert engine.stats().kv_cache_usage == 0
