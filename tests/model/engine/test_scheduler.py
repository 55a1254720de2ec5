"""Scheduler: budget packing, chunked prefill, preemption, aborts, random soak (no torch)."""

import random
import subprocess
import sys
from pathlib import Path

import pytest

from model.engine.block_manager import BlockManager
from model.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from model.engine.sequence import Sequence, SequenceStatus

ROOT = Path(__file__).resolve().parents[3]


def make_scheduler(
    num_blocks=64, block_size=4, max_num_seqs=8, budget=16, max_model_len=64, caching=True
) -> Scheduler:
    config = SchedulerConfig(max_num_seqs, budget, max_model_len, block_size)
    return Scheduler(config, BlockManager(num_blocks, block_size, caching))


def make_seq(prompt_len=None, tokens=None, request_id=None, max_tokens=1000, start=0) -> Sequence:
    if tokens is None:
        tokens = list(range(start, start + prompt_len))
    seq = Sequence(tokens, request_id=request_id or "", max_tokens=max_tokens)
    if request_id is None:
        seq.request_id = f"req-{seq.seq_id}"
    return seq


def step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """Play the engine once: schedule, 'run', update, finish at max_tokens."""
    out = sched.schedule()
    sampled = [token for s in out.scheduled if s.is_sampling]
    for seq in sched.update(out, sampled):
        if seq.num_output_tokens >= seq.max_tokens:
            sched.finish(seq, "length")
    return out


def plan(out: SchedulerOutput) -> list[tuple[int, int]]:
    return [(s.seq.seq_id, s.num_new_tokens) for s in out.scheduled]


def test_config_validation():
    with pytest.raises(ValueError):
        SchedulerConfig(0, 16, 64)
    with pytest.raises(ValueError):
        SchedulerConfig(32, 16, 64)  # decodes of a full batch would not fit the budget
    with pytest.raises(ValueError):
        make_scheduler(num_blocks=4, block_size=4, max_model_len=64)  # pool < one sequence
    sched = make_scheduler(max_model_len=8)
    with pytest.raises(ValueError):
        sched.add(make_seq(9))


def test_budget_packing_decodes_first_then_prefill_chunks():
    sched = make_scheduler(budget=16)
    shorts = [make_seq(2, start=10 * i) for i in range(3)]
    for s in shorts:
        sched.add(s)
    assert plan(step(sched)) == [(s.seq_id, 2) for s in shorts]
    long = make_seq(40, start=100)
    sched.add(long)
    expected_chunks = [13, 13, 13, 1]
    for chunk in expected_chunks:
        out = step(sched)
        assert plan(out) == [(s.seq_id, 1) for s in shorts] + [(long.seq_id, chunk)]
        assert out.num_batched_tokens <= 16
    assert long.num_output_tokens == 1 and not long.is_prefill
    assert [s.num_output_tokens for s in shorts] == [5, 5, 5]


def test_long_prefill_never_stalls_running_decodes():
    sched = make_scheduler(budget=8)
    early = make_seq(2)
    long = make_seq(50, start=100)
    sched.add(early)
    sched.add(long)
    first = step(sched)
    assert plan(first) == [(early.seq_id, 2), (long.seq_id, 6)]
    while long.is_prefill:
        out = step(sched)
        assert out.scheduled[0].seq is early and out.scheduled[0].num_new_tokens == 1
    assert early.num_output_tokens == long.num_output_tokens + 7


def test_chunked_prefill_in_admission_order():
    sched = make_scheduler(budget=8)
    a = make_seq(20)
    b = make_seq(20, start=50)
    sched.add(a)
    sched.add(b)
    plans = [plan(step(sched)) for _ in range(5)]
    assert plans == [
        [(a.seq_id, 8)],
        [(a.seq_id, 8)],
        [(a.seq_id, 4), (b.seq_id, 4)],
        [(a.seq_id, 1), (b.seq_id, 7)],
        [(a.seq_id, 1), (b.seq_id, 7)],
    ]
    assert a.num_output_tokens == 3 and b.num_computed_tokens == 18


def test_is_sampling_only_on_last_chunk():
    sched = make_scheduler(budget=8)
    seq = make_seq(12)
    sched.add(seq)
    out = sched.schedule()
    assert [s.is_sampling for s in out.scheduled] == [False]
    assert sched.update(out, []) == []
    out = sched.schedule()
    assert [s.is_sampling for s in out.scheduled] == [True]
    assert sched.update(out, [5]) == [seq]
    assert seq.output_token_ids == [5] and seq.num_computed_tokens == 12


def test_max_num_seqs():
    sched = make_scheduler(max_num_seqs=2, budget=16)
    seqs = [make_seq(3, start=10 * i, max_tokens=2) for i in range(5)]
    for s in seqs:
        sched.add(s)
    out = step(sched)
    assert [s.seq for s in out.scheduled] == seqs[:2]
    assert sched.num_running == 2 and sched.num_waiting == 3
    step(sched)  # both reach max_tokens and finish
    assert seqs[0].is_finished and seqs[1].is_finished
    out = step(sched)
    assert [s.seq for s in out.scheduled] == seqs[2:4]
    while sched.has_unfinished:
        step(sched)
    assert all(s.finish_reason == "length" and s.num_output_tokens == 2 for s in seqs)


def test_preemption_most_recent_first_and_readmitted_before_new():
    # 6 blocks of 2 tokens: three 3-token prompts fill the pool.
    sched = make_scheduler(num_blocks=6, block_size=2, budget=16, max_model_len=12)
    a, b, c = (make_seq(3, start=10 * i, max_tokens=4) for i in range(3))
    for s in (a, b, c):
        sched.add(s)
    step(sched)
    step(sched)
    assert sched.block_manager.num_free_blocks == 0
    out = step(sched)  # a and b need a third block each: c (the latest) goes
    assert out.preempted == [c]
    assert plan(out) == [(a.seq_id, 1), (b.seq_id, 1)]
    assert c.status is SequenceStatus.WAITING and c.num_preemptions == 1
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert c.num_prompt_tokens == 3 and c.num_output_tokens == 2  # outputs kept
    assert c.is_prefill
    late = make_seq(3, start=90, max_tokens=1)
    sched.add(late)
    assert list(sched.waiting) == [c, late]
    while c.status is SequenceStatus.WAITING:
        assert late.status is SequenceStatus.WAITING
        out = step(sched)
    # Re-admitted ahead of `late`, recomputing prompt + outputs (its freed blocks were
    # evicted to give a and b their third block).
    assert plan(out) == [(c.seq_id, 5), (late.seq_id, 3)]
    assert c.num_cached_tokens == 0
    while sched.has_unfinished:
        step(sched)
    assert [s.num_output_tokens for s in (a, b, c, late)] == [4, 4, 4, 1]
    assert sched.block_manager.num_free_blocks == 6


def test_preempts_itself_when_it_is_the_latest():
    sched = make_scheduler(num_blocks=4, block_size=2, budget=16, max_model_len=8)
    a = make_seq(3, start=0, max_tokens=5)
    b = make_seq(3, start=10, max_tokens=5)
    sched.add(a)
    sched.add(b)
    step(sched)
    step(sched)
    out = step(sched)
    assert out.preempted == [b]
    assert plan(out) == [(a.seq_id, 1)]
    while sched.has_unfinished:
        step(sched)
    assert a.num_output_tokens == b.num_output_tokens == 5


def test_preempted_sequence_skips_recompute_of_cached_blocks():
    sched = make_scheduler(num_blocks=8, block_size=4, budget=32, max_model_len=32)
    a = make_seq(13, max_tokens=6)
    sched.add(a)
    step(sched)
    sched._preempt(a)  # as the schedule loop would under pressure
    out = step(sched)
    assert plan(out) == [(a.seq_id, 2)]  # 12 cached tokens, 14 total
    assert a.num_cached_tokens == 12


def test_n_siblings_share_prompt_blocks():
    sched = make_scheduler(budget=32)
    prompt = list(range(10))
    sibs = [make_seq(tokens=prompt, request_id="r", max_tokens=3) for _ in range(3)]
    for s in sibs:
        sched.add(s)
    assert plan(step(sched)) == [(sibs[0].seq_id, 10)]
    out = step(sched)
    assert plan(out) == [(sibs[0].seq_id, 1), (sibs[1].seq_id, 2), (sibs[2].seq_id, 2)]
    assert [s.num_cached_tokens for s in sibs] == [0, 8, 8]
    bm = sched.block_manager
    assert [bm.blocks[i].ref_count for i in sibs[0].block_table[:2]] == [3, 3]
    bm.check_invariants(sched.running.values())


def test_abort_frees_everything():
    sched = make_scheduler(num_blocks=16, budget=16, max_num_seqs=3)
    bm = sched.block_manager
    seqs = [make_seq(tokens=list(range(9)), request_id="shared") for _ in range(2)]
    seqs += [make_seq(7, start=100 + 10 * i) for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(3):
        step(sched)
    assert sched.num_running == 3 and sched.num_waiting == 2
    assert sched.abort("nope") == []
    aborted = sched.abort("shared")
    assert aborted == seqs[:2]
    assert all(s.finish_reason == "abort" and s.block_table == [] for s in aborted)
    assert sched.abort("shared") == []  # idempotent
    for s in seqs[2:]:
        sched.abort(s.request_id)
    assert not sched.has_unfinished
    assert bm.num_free_blocks == 16 and bm.usage == 0.0
    bm.check_invariants([])


def test_abort_between_schedule_and_update():
    sched = make_scheduler()
    a, b = make_seq(5), make_seq(5, start=20)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    sched.abort(a.request_id)
    grown = sched.update(out, [1, 2])
    assert grown == [b] and a.num_output_tokens == 0
    sched.block_manager.check_invariants(sched.running.values())


def test_usage_ratio():
    sched = make_scheduler(num_blocks=16, block_size=4, max_model_len=32)
    sched.add(make_seq(10))
    sched.add(make_seq(3, start=50))
    step(sched)
    assert sched.block_manager.usage == pytest.approx(4 / 16)
    for seq in list(sched.running.values()):
        sched.finish(seq, "stop")
    assert sched.block_manager.usage == 0.0


# ---- randomized soak -----------------------------------------------------------------


def check_kv_contents(sched: Scheduler, out: SchedulerOutput, pool: list) -> None:
    """Simulate the attention backend: write each new token's 'K/V' (its whole prefix)
    into its slot, then check every context slot read holds the right prefix."""
    bs = sched.config.block_size
    for item in out.scheduled:
        seq = item.seq
        start = seq.num_computed_tokens
        for p in range(start, start + item.num_new_tokens):
            pool[seq.block_table[p // bs] * bs + p % bs] = tuple(seq.token_ids[: p + 1])
    for item in out.scheduled:
        seq = item.seq
        for p in range(seq.num_computed_tokens + item.num_new_tokens):
            slot = seq.block_table[p // bs] * bs + p % bs
            assert pool[slot] == tuple(seq.token_ids[: p + 1]), (seq, p)


def run_random(seed: int, caching: bool, weak_hash: bool = False) -> tuple[int, int]:
    rng = random.Random(seed)
    bs = rng.choice([1, 2, 4])
    max_model_len = rng.randint(6, 24)
    num_blocks = -(-max_model_len // bs) + rng.randint(0, 8)
    max_num_seqs = rng.randint(1, 6)
    budget = max_num_seqs + rng.randint(0, 12)
    sched = make_scheduler(num_blocks, bs, max_num_seqs, budget, max_model_len, caching)
    bm = sched.block_manager
    if weak_hash:
        bm.hash_fn = lambda parent, tokens: tokens[0]  # collides all the time
    pool: list = [None] * (num_blocks * bs)
    prefixes = [[rng.randrange(3) for _ in range(max_model_len)] for _ in range(3)]
    all_seqs: list[Sequence] = []
    num_requests = 12
    for step_index in range(3000):
        if len({s.request_id for s in all_seqs}) < num_requests and rng.random() < 0.3:
            prompt_len = rng.randint(1, max_model_len - 1)
            prompt = rng.choice(prefixes)[: rng.randint(0, prompt_len)]
            prompt += [rng.randrange(3) for _ in range(prompt_len - len(prompt))]
            max_tokens = rng.randint(1, max_model_len - prompt_len)
            request_id = f"r{step_index}"
            for _ in range(rng.choice([1, 1, 2, 3])):
                seq = Sequence(prompt, request_id=request_id, max_tokens=max_tokens)
                all_seqs.append(seq)
                sched.add(seq)
        if rng.random() < 0.03:
            live = [s for s in all_seqs if not s.is_finished]
            if live:
                sched.abort(rng.choice(live).request_id)

        decoding = [s for s in sched.running.values() if not s.is_prefill]
        out = sched.schedule()
        ids = [s.seq.seq_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        assert out.num_batched_tokens <= budget
        assert sched.num_running <= max_num_seqs
        assert all(s.seq.status is SequenceStatus.RUNNING for s in out.scheduled)
        assert all(s.status is SequenceStatus.WAITING and not s.block_table for s in out.preempted)
        # A running decode is never skipped: it runs or is preempted.
        assert {s.seq_id for s in decoding} <= set(ids) | {s.seq_id for s in out.preempted}
        bm.check_invariants(sched.running.values())
        assert all(not s.block_table for s in sched.waiting)
        check_kv_contents(sched, out, pool)

        sampled = [rng.randrange(3) for s in out.scheduled if s.is_sampling]
        for seq in sched.update(out, sampled):
            if seq.num_output_tokens >= seq.max_tokens:
                sched.finish(seq, "length")
            elif rng.random() < 0.05:
                sched.finish(seq, "stop")
        bm.check_invariants(sched.running.values())
        if len({s.request_id for s in all_seqs}) == num_requests and not sched.has_unfinished:
            break
    assert not sched.has_unfinished, "scheduler stalled"
    assert len({s.request_id for s in all_seqs}) == num_requests
    for seq in all_seqs:
        assert seq.is_finished and not seq.block_table
        if seq.finish_reason == "length":
            assert seq.num_output_tokens == seq.max_tokens
    assert bm.num_free_blocks == num_blocks and bm.usage == 0.0
    bm.check_invariants([])
    return sum(s.num_preemptions for s in all_seqs), bm.num_hit_tokens


@pytest.mark.parametrize(("caching", "weak_hash"), [(True, False), (False, False), (True, True)])
def test_random_soak_keeps_invariants(caching, weak_hash):
    total_preemptions = total_hits = 0
    for seed in range(40):
        preemptions, hits = run_random(seed, caching, weak_hash)
        total_preemptions += preemptions
        total_hits += hits
    # The soak must actually exercise preemption (and the prefix cache when on).
    assert total_preemptions > 0
    assert (total_hits > 0) == caching


def test_modules_import_no_torch():
    code = (
        "import sys, model.engine.scheduler, model.engine.block_manager, model.engine.sequence; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
