"""Prompt logprobs (scoring) against HF transformers' log_softmax on the default model.

Plain, after a prefix-cache hit (the scoring request skips the cache), and with chunked
prefill; max_tokens 0 scores without sampling; the entries ride on each choice's first delta.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from model.engine.block_manager import BlockManager
from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.engine.outputs import GenerationDelta, PromptLogprob
from model.engine.scheduler import Scheduler, SchedulerConfig
from model.engine.sequence import Sequence
from model.sampling_params import SamplingParams

ATOL = 1e-4
TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and "
    "Berlin is the capital of Germany. Water boils at one hundred degrees Celsius at sea level."
)


@pytest.fixture(scope="module")
def engine(default_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model_dir=str(default_model_dir), device="cpu"))


def hf_logprobs(hf_model, ids: list[int]) -> torch.Tensor:
    """[len(ids) - 1, vocab]: row i is HF's log_softmax predicting ids[i + 1]."""
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)[:-1]


def score(engine: LLMEngine, ids: list[int], k: int = 3, **kw) -> list[GenerationDelta]:
    params = SamplingParams(temperature=0.0, max_tokens=0, prompt_logprobs=k, **kw)
    return engine.generate([ids], params)[0]


def assert_matches_hf(prompt_logprobs, ids: list[int], ref: torch.Tensor, k: int) -> None:
    assert len(prompt_logprobs) == len(ids)
    first = prompt_logprobs[0]
    assert (first.token_id, first.logprob, first.rank, first.top) == (ids[0], None, None, [])
    for i, entry in enumerate(prompt_logprobs[1:]):
        row = ref[i]
        assert entry.token_id == ids[i + 1]
        assert entry.logprob == pytest.approx(row[ids[i + 1]].item(), abs=ATOL), f"token {i + 1}"
        # The rank within float noise: count the tokens clearly more likely, and those tied.
        above = int((row > entry.logprob + ATOL).sum())
        tied = int((row > entry.logprob - ATOL).sum())
        assert above + 1 <= entry.rank <= tied, f"token {i + 1}: rank {entry.rank}"
        values, _ = torch.topk(row, k)
        assert len(entry.top) == k
        assert [v for _, v in entry.top] == pytest.approx(values.tolist(), abs=ATOL)
        for token_id, value in entry.top:
            assert row[token_id].item() == pytest.approx(value, abs=ATOL)


def test_scheduler_never_samples_a_score_only_seq_and_skips_the_cache_for_scoring():
    sched = Scheduler(SchedulerConfig(4, 8, 64, 4), BlockManager(32, 4))
    cached = Sequence(list(range(10)), request_id="a", max_tokens=1)
    sched.add(cached)
    while cached.num_output_tokens == 0:
        out = sched.schedule()
        sched.update(out, [5] * len(out.sampling_seqs))
    sched.finish(cached)  # its two full prompt blocks stay in the prefix cache
    plain = Sequence(list(range(10)), request_id="b", max_tokens=0)
    scoring = Sequence(list(range(10)), request_id="c", max_tokens=0)
    scoring.prompt_logprobs = [PromptLogprob(0, None, None, [])]
    sched.add(plain)
    sched.add(scoring)
    out = sched.schedule()
    assert [(s.seq, s.num_new_tokens) for s in out.scheduled] == [(plain, 2), (scoring, 6)]
    assert plain.num_cached_tokens == 8 and scoring.num_cached_tokens == 0
    assert out.sampling_seqs == [] and out.scored_seqs == [plain]


def test_score_only_matches_hf(engine, hf_model):
    ids = engine.tokenizer.encode(TEXT)
    [delta] = score(engine, ids)
    assert (delta.token_ids, delta.finish_reason, delta.num_output_tokens) == ([], "length", 0)
    assert_matches_hf(delta.prompt_logprobs, ids, hf_logprobs(hf_model, ids), 3)
    assert engine.block_manager.usage == 0.0


def test_prefix_cache_hit_is_recomputed(engine, hf_model):
    ids = engine.tokenizer.encode("Once upon a time, " + TEXT)
    assert len(ids) > 2 * engine.config.block_size
    engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))  # caches the prompt
    [[warm]] = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=1))
    assert warm.num_cached_tokens > 0  # the blocks are in the cache
    [delta] = score(engine, ids, k=2)
    assert delta.num_cached_tokens == 0  # scoring skipped them
    assert_matches_hf(delta.prompt_logprobs, ids, hf_logprobs(hf_model, ids), 2)


def test_chunked_prefill_matches_hf(default_model_dir, hf_model):
    small = LLMEngine(
        EngineConfig(
            model_dir=str(default_model_dir),
            device="cpu",
            max_model_len=256,
            max_num_seqs=4,
            max_num_batched_tokens=24,
            kv_cache_memory_bytes=64 * 16 * 30 * 2 * 3 * 64 * 4,
        )
    )
    ids = small.tokenizer.encode(TEXT + " " + TEXT)
    assert len(ids) > 2 * 24  # three chunks, not aligned to the 16-token blocks
    [delta] = score(small, ids, k=1)
    assert_matches_hf(delta.prompt_logprobs, ids, hf_logprobs(hf_model, ids), 1)


def test_preemption_mid_prefill_scores_each_token_once(default_model_dir, hf_model):
    # 9 blocks of 16 tokens, 8-token steps: a decoding request grows into the blocks of a scoring
    # one that is still prefilling, which is preempted (the latest admission) and recomputed.
    small = LLMEngine(
        EngineConfig(
            model_dir=str(default_model_dir),
            device="cpu",
            max_model_len=144,
            max_num_seqs=2,
            max_num_batched_tokens=8,
            kv_cache_memory_bytes=9 * 16 * 30 * 2 * 3 * 64 * 4,
        )
    )
    tok = small.tokenizer
    decoding, scored = tok.encode(TEXT + " " + TEXT), tok.encode("Once upon a time. " + TEXT * 2)
    small.add_request(
        "g", decoding, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    )
    deltas: list[GenerationDelta] = []
    num_partly_scored_preempted = 0
    for step in itertools.count():
        if step == len(decoding) // 8:  # the decoding request's prompt is done
            params = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=1)
            small.add_request("s", scored, params)
        deltas += [d for rid, d in small.step() if rid == "s"]
        num_partly_scored_preempted += sum(
            1 for q in small.scheduler.waiting if q.num_preemptions and q.needs_prompt_logprobs
        )
        if not small.has_unfinished():
            break
    assert num_partly_scored_preempted > 0
    assert_matches_hf(deltas[0].prompt_logprobs, scored, hf_logprobs(hf_model, scored), 1)
    assert all(d.prompt_logprobs is None for d in deltas[1:])


def test_first_delta_of_each_choice_carries_them(engine, hf_model):
    ids = engine.tokenizer.encode(TEXT)
    params = SamplingParams(
        n=2, temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1, prompt_logprobs=0
    )
    engine.add_request("r", ids, params)
    deltas: list[GenerationDelta] = []
    while engine.has_unfinished():
        deltas.extend(delta for _, delta in engine.step())
    ref = hf_logprobs(hf_model, ids)
    for index in (0, 1):
        mine = [d for d in deltas if d.choice_index == index]
        assert len(mine) == 3 and all(d.prompt_logprobs is None for d in mine[1:])
        assert_matches_hf(mine[0].prompt_logprobs, ids, ref, 0)
        # The first completion token's logprob continues the same distribution.
        assert mine[0].logprobs[0].logprob == pytest.approx(
            torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, -1].float(), -1)[
                mine[0].token_ids[0]
            ].item(),
            abs=ATOL,
        )


def test_without_prompt_logprobs_none_are_returned(engine):
    ids = engine.tokenizer.encode(TEXT)
    [[delta]] = engine.generate([ids], SamplingParams(temperature=0.0, max_tokens=2))
    assert delta.prompt_logprobs is None and len(delta.token_ids) == 2
