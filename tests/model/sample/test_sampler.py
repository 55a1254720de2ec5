"""Sampler tests on random CPU logits: processors against direct references, seeds, logprobs."""

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from model.sample.metadata import SamplingMetadata, SamplingRow, make_generator
from model.sample.sampler import (
    LOGPROB_FLOOR,
    TOP_P_CANDIDATES,
    Sampler,
    _apply_top_p_,
    apply_logits_processors,
)
from model.sampling_params import SamplingParams

CPU = torch.device("cpu")


def _rows(params_list, prompts=None, outputs=None, generators=None, stop_ids=None):
    n = len(params_list)
    prompts = prompts or [[1, 2, 3]] * n
    outputs = outputs or [[]] * n
    generators = generators or [None] * n
    stop_ids = stop_ids or [()] * n
    return [
        SamplingRow(p, pr, out, g, s)
        for p, pr, out, g, s in zip(
            params_list, prompts, outputs, generators, stop_ids, strict=True
        )
    ]


def _sample(logits, params_list, sampler=None, **kw):
    meta = SamplingMetadata.build(_rows(params_list, **kw), logits.shape[1], CPU)
    return (sampler or Sampler(seed=0))(logits, meta)


def _draw_many(probs, params, num_draws, seed=0):
    """Samples num_draws times from one distribution in one batched call; returns counts."""
    logits = torch.log(torch.tensor(probs, dtype=torch.float32)).expand(num_draws, -1).contiguous()
    out = _sample(logits, [params] * num_draws, sampler=Sampler(seed=seed))
    return torch.bincount(torch.tensor(out.token_ids), minlength=len(probs))


def test_greedy_equals_argmax_and_input_untouched():
    torch.manual_seed(0)
    logits = torch.randn(6, 100)
    before = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1e-6, top_k=3)] * 3
    out = _sample(logits, params)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 6
    assert torch.equal(logits, before)


def test_work_buffers_reused_across_batch_sizes_and_input_untouched():
    torch.manual_seed(10)
    sampler = Sampler(seed=0)
    params = SamplingParams(temperature=0.0, repetition_penalty=1.5, logit_bias={0: 1.0})
    for num_rows in (6, 2, 9, 1):
        logits = torch.randn(num_rows, 40).to(torch.bfloat16)
        before = logits.clone()
        rows = _rows([params] * num_rows)
        out = sampler(logits, SamplingMetadata.build(rows, 40, CPU))
        want = apply_logits_processors(logits, SamplingMetadata.build(rows, 40, CPU)).argmax(-1)
        assert out.token_ids == want.tolist()
        assert torch.equal(logits, before)


def test_greedy_rows_mixed_with_random_rows():
    torch.manual_seed(1)
    logits = torch.randn(4, 50)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0)]
    params.append(SamplingParams(top_p=0.5))
    out = _sample(logits, params)
    assert out.token_ids[0] == logits[0].argmax().item()
    assert out.token_ids[2] == logits[2].argmax().item()


def test_default_params_skip_optional_ops():
    params = [SamplingParams(), SamplingParams(temperature=0.0, top_k=5, top_p=0.5)]
    params += [SamplingParams(top_k=-1), SamplingParams(top_k=32)]  # off, and >= vocab
    params.append(SamplingParams(frequency_penalty=1.0, presence_penalty=1.0))  # no output yet
    meta = SamplingMetadata.build(_rows(params), 32, CPU)
    assert meta.top_k is None and meta.top_p is None and meta.min_p is None
    assert meta.repetition_index is None and meta.frequency_index is None
    assert meta.bias_index is None and meta.min_tokens_index is None
    assert meta.logprob_rows is None and not meta.all_greedy and meta.any_greedy


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_distribution(temperature):
    base = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    num_draws = 4000
    counts = _draw_many(
        base.softmax(-1).tolist(), SamplingParams(temperature=temperature), num_draws
    )
    expected = (base / temperature).softmax(-1) * num_draws
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25.0, (chi2, counts.tolist(), expected.tolist())  # df=4; p(chi2>25) ~ 5e-5


def test_top_k_restricts_support():
    torch.manual_seed(2)
    probs = torch.rand(40).softmax(-1)
    counts = _draw_many(probs.tolist(), SamplingParams(temperature=1.5, top_k=3), 2000)
    allowed = set(probs.topk(3).indices.tolist())
    assert set(counts.nonzero().flatten().tolist()) == allowed


@pytest.mark.parametrize(
    ("top_p", "nucleus"), [(0.45, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (1.0, {0, 1, 2, 3, 4})]
)
def test_top_p_restricts_to_nucleus(top_p, nucleus):
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    counts = _draw_many(probs, SamplingParams(top_p=top_p), 3000)
    assert set(counts.nonzero().flatten().tolist()) == nucleus


@pytest.mark.parametrize(
    ("min_p", "support"), [(0.2, {0, 1, 2}), (0.5, {0, 1}), (0.0, {0, 1, 2, 3})]
)
def test_min_p(min_p, support):
    counts = _draw_many([0.5, 0.3, 0.15, 0.05], SamplingParams(min_p=min_p), 3000)
    assert set(counts.nonzero().flatten().tolist()) == support


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0], ids=["flat", "mid", "peaked"])
def test_top_p_mask_matches_sorted_reference(scale):
    # Vocab larger than the candidate sets: peaked rows use candidates, flat rows the full sort.
    torch.manual_seed(9)
    vocab = TOP_P_CANDIDATES[-1] + 500
    logits = torch.randn(4, vocab) * scale
    top_p = [0.3, 0.9, 0.99, 1.0]
    params = [SamplingParams(top_p=p) for p in top_p] + [SamplingParams(temperature=0.0)]
    logits = torch.cat([logits, torch.randn(1, vocab)])
    meta = SamplingMetadata.build(_rows(params), vocab, CPU)
    got = logits.clone()
    _apply_top_p_(got, meta)
    probs = logits.double().softmax(-1)
    for row, p in enumerate(top_p):
        sorted_probs, order = probs[row].sort(descending=True)
        mass_above = sorted_probs.cumsum(0) - sorted_probs
        want = torch.zeros(vocab, dtype=torch.bool)
        want[order[mass_above < p]] = True
        assert torch.equal(got[row].isfinite(), want), row
        assert torch.equal(got[row][want], logits[row][want])
    assert torch.equal(got[4], logits[4])  # greedy row untouched


def test_top_k_then_top_p_renormalises():
    # top_k=3 leaves [0.5, 0.3, 0.1] -> renormalised [0.556, 0.333, 0.111]; top_p=0.8 keeps 2.
    probs = [0.5, 0.3, 0.1, 0.06, 0.04]
    counts = _draw_many(probs, SamplingParams(top_k=3, top_p=0.8), 2000)
    assert set(counts.nonzero().flatten().tolist()) == {0, 1}


def test_frequency_presence_penalties_match_reference():
    torch.manual_seed(3)
    vocab = 30
    logits = torch.randn(4, vocab)
    params = [
        SamplingParams(frequency_penalty=0.7, presence_penalty=0.3),
        SamplingParams(),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5),
        SamplingParams(frequency_penalty=1.0),
    ]
    prompts = [[5, 5, 6], [1], [7, 8], [3]]  # prompt tokens never count for these penalties
    outputs = [[1, 1, 1, 4], [1, 2], [7, 29, 29], []]
    meta = SamplingMetadata.build(_rows(params, prompts, outputs), vocab, CPU)
    got = apply_logits_processors(logits, meta)
    want = logits.clone()
    for i, (p, out) in enumerate(zip(params, outputs, strict=True)):
        for tok in set(out):
            want[i, tok] -= p.frequency_penalty * out.count(tok) + p.presence_penalty
    torch.testing.assert_close(got, want)


def test_repetition_penalty_matches_transformers():
    torch.manual_seed(4)
    vocab = 40
    logits = torch.randn(3, vocab) * 3
    penalties = [1.3, 1.0, 0.7]
    prompts = [[3, 4, 4, 9], [1, 2], [0, 39, 5]]
    outputs = [[9, 11], [3], [5, 5, 20]]
    params = [SamplingParams(repetition_penalty=rp) for rp in penalties]
    meta = SamplingMetadata.build(_rows(params, prompts, outputs), vocab, CPU)
    got = apply_logits_processors(logits, meta)
    for i, rp in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        want = RepetitionPenaltyLogitsProcessor(penalty=rp)(ids, logits[i : i + 1].clone())
        torch.testing.assert_close(got[i : i + 1], want)


def test_all_penalties_combined_order():
    logits = torch.tensor([[2.0, -1.0, 0.5, 1.0]])
    p = SamplingParams(
        repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25, logit_bias={3: -3.0}
    )
    meta = SamplingMetadata.build(_rows([p], prompts=[[0]], outputs=[[1, 1, 3]]), 4, CPU)
    got = apply_logits_processors(logits, meta)
    # bias: token3 -> -2.0; repetition (seen 0,1,3): 1.0, -2.0, 0.5, -4.0; freq/presence on 1, 3.
    want = torch.tensor([[1.0, -2.0 - 1.0 - 0.25, 0.5, -4.0 - 0.5 - 0.25]])
    torch.testing.assert_close(got, want)


def test_logit_bias_forces_and_bans():
    torch.manual_seed(5)
    logits = torch.randn(4, 64)
    top = logits.argmax(-1)
    params = [
        SamplingParams(logit_bias={17: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={17: 100.0}),
        SamplingParams(temperature=0.0, logit_bias={int(top[2]): -100.0}),
        SamplingParams(temperature=2.0, logit_bias={t: -100.0 for t in range(1, 64)}),
    ]
    for step in range(5):
        out = _sample(logits, params, sampler=Sampler(seed=step))
        assert out.token_ids[:2] == [17, 17]
        assert out.token_ids[2] != top[2].item()
        assert out.token_ids[2] == logits[2].topk(2).indices[1].item()
        assert out.token_ids[3] == 0


def test_min_tokens_masks_stop_ids():
    logits = torch.zeros(3, 10)
    logits[:, 2] = 50.0  # EOS dominates
    logits[:, 7] = 40.0  # user stop id
    params = [SamplingParams(temperature=0.0, min_tokens=3)] * 2 + [SamplingParams(min_tokens=3)]
    outputs = [[4], [4, 4, 4], [4, 5]]
    stop_ids = [{2, 7}, {2, 7}, [2, 7]]
    out = _sample(logits, params, outputs=outputs, stop_ids=stop_ids)
    assert out.token_ids[0] not in (2, 7)
    assert out.token_ids[1] == 2  # min_tokens reached: EOS allowed again
    assert out.token_ids[2] not in (2, 7)


def _seeded_run(seed, step_logits, companions, **own):
    """Samples the seeded row at index 1 of a batch with companion rows; returns its tokens."""
    params = SamplingParams(temperature=0.8, seed=seed, **own)
    gen = make_generator(seed, CPU)
    sampler = Sampler(seed=123)
    outputs: list[int] = []
    for logits in step_logits:
        rows = [SamplingRow(params, [1, 2], list(outputs), gen)]
        batch = logits.unsqueeze(0)
        if companions:
            extra = [
                SamplingRow(SamplingParams(temperature=1.3, top_k=5, top_p=0.9), [3], [], None),
                SamplingRow(
                    SamplingParams(temperature=0.0, repetition_penalty=1.2), [3, 4], [1], None
                ),
                SamplingRow(
                    SamplingParams(seed=7, min_p=0.1, frequency_penalty=1.0),
                    [],
                    [2],
                    make_generator(7, CPU),
                ),
                SamplingRow(SamplingParams(logprobs=5, logit_bias={3: 5.0}), [5], [], None),
            ]
            rows = extra[:1] + rows + extra[1:]
            batch = torch.cat(
                [torch.randn(1, logits.shape[0]), batch, torch.randn(3, logits.shape[0])]
            )
        meta = SamplingMetadata.build(rows, logits.shape[0], CPU)
        out = sampler(batch, meta)
        outputs.append(out.token_ids[1 if companions else 0])
    return outputs


@pytest.mark.parametrize(
    "own",
    [{}, {"top_k": 50, "frequency_penalty": 0.5, "repetition_penalty": 1.1}],
    ids=["plain", "own-processors"],
)
def test_seeded_row_same_alone_and_in_batch(own):
    torch.manual_seed(6)
    step_logits = [torch.randn(200) * 0.5 for _ in range(8)]
    alone = _seeded_run(42, step_logits, False, **own)
    in_batch = _seeded_run(42, step_logits, True, **own)
    assert alone == in_batch
    assert _seeded_run(42, step_logits, False, **own) == alone
    assert _seeded_run(43, step_logits, False, **own) != alone


def test_make_generator():
    assert make_generator(None, CPU) is None
    a, b = make_generator(5, "cpu"), make_generator(5, CPU)
    assert torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b))
    assert make_generator(-1, CPU) is not None  # negative seeds are folded into 64 bits


def test_logprobs_match_log_softmax_and_top_sorted():
    torch.manual_seed(8)
    logits = torch.randn(4, 80)
    params = [
        SamplingParams(logprobs=5, temperature=0.3, top_k=4),
        SamplingParams(),
        SamplingParams(logprobs=20, temperature=0.0),
        SamplingParams(logprobs=0),
    ]
    out = _sample(logits, params)
    ref = torch.log_softmax(logits, -1)  # before temperature and truncation
    assert out.logprobs[1] is None
    for row, k in ((0, 5), (2, 20), (3, 0)):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        assert lp.logprob == pytest.approx(ref[row, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == k
        vals = [v for _, v in lp.top]
        assert vals == sorted(vals, reverse=True)
        assert [t for t, _ in lp.top] == ref[row].topk(k).indices.tolist()
        for tok, val in lp.top:
            assert val == pytest.approx(ref[row, tok].item(), abs=1e-5)
    assert out.logprobs[3].top == []


def test_logprobs_after_penalties_and_floor():
    logits = torch.zeros(1, 8)
    params = [SamplingParams(logprobs=8, min_tokens=2, temperature=0.0, logit_bias={5: 3.0})]
    out = _sample(logits, params, stop_ids=[{0}])
    ref = torch.log_softmax(torch.tensor([-math.inf, 0, 0, 0, 0, 3.0, 0, 0]), -1)
    lp = out.logprobs[0]
    assert lp.token_id == 5 and lp.logprob == pytest.approx(ref[5].item(), abs=1e-5)
    assert lp.top[-1] == (0, LOGPROB_FLOOR)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 0),
        ("max_tokens", -1),
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_p", 0.0),
        ("top_p", 1.1),
        ("top_k", -2),
        ("min_p", 1.5),
        ("frequency_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("repetition_penalty", 0.0),
        ("logit_bias", {1: 150.0}),
        ("logit_bias", {-1: 1.0}),
        ("seed", 1.5),
        ("logprobs", 21),
        ("logprobs", -1),
        ("stop", [""]),
        ("stop_token_ids", [-1]),
        ("min_tokens", -1),
        ("ignore_eos", "yes"),
    ],
)
def test_validation_errors(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_validation_min_tokens_vs_max_and_vocab_check():
    with pytest.raises(ValueError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
    assert SamplingParams(stop="x").stop == ["x"]
    resolved = dataclasses.replace(SamplingParams(logit_bias={1: 2}), max_tokens=5)
    assert resolved.logit_bias == {1: 2.0} and resolved.max_tokens == 5
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={100: 1.0}).check_token_ids(50)
    with pytest.raises(ValueError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[50]).check_token_ids(50)
