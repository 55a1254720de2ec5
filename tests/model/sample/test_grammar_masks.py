"""Grammar masks in the sampler: constrained rows draw only allowed tokens, others are untouched."""

import torch

from model.sample.metadata import SamplingMetadata, SamplingRow, make_generator
from model.sample.sampler import Sampler
from model.sampling_params import SamplingParams
from model.structured import GrammarCompiler, GrammarMatcher, StructuredSpec, VocabIndex

CPU = torch.device("cpu")
TOKENS = [b"a", b"b", b"c", b"d", b"ab", b"ac", b"x", b""]  # id 7: EOS
EOS = 7
WIDTH = 10  # the logits are wider than the vocabulary (a padded embedding)


def _matcher(pattern: str) -> GrammarMatcher:
    compiler = GrammarCompiler(VocabIndex(TOKENS, {EOS}, vocab_size=WIDTH))
    return GrammarMatcher(compiler.compile(StructuredSpec("regex", pattern)), [EOS])


def _row(params, matcher=None, seed=None):
    return SamplingRow(params, [1], [], make_generator(seed, CPU), (), matcher)


def test_unconstrained_batches_build_no_masks():
    meta = SamplingMetadata.build([_row(SamplingParams())] * 3, WIDTH, CPU)
    assert meta.matchers is None


def test_constrained_rows_draw_allowed_tokens_and_others_are_untouched():
    torch.manual_seed(0)
    logits = torch.randn(64, WIDTH)
    params = SamplingParams(temperature=1.0, logprobs=2)
    rows, plain = [], []
    for i in range(64):
        matcher = _matcher("a(b|c)") if i % 2 == 0 else None
        rows.append(_row(params, matcher, seed=i))
        plain.append(_row(params, None, seed=i))
    out = Sampler(seed=0)(logits, SamplingMetadata.build(rows, WIDTH, CPU))
    ref = Sampler(seed=0)(logits, SamplingMetadata.build(plain, WIDTH, CPU))
    for i in range(64):
        if i % 2 == 0:
            assert out.token_ids[i] in (0, 4, 5)  # "a", "ab", "ac"
            # logprobs describe the masked distribution: the top-2 are allowed tokens
            assert all(t in (0, 4, 5) for t, _ in out.logprobs[i].top)
        else:
            assert out.token_ids[i] == ref.token_ids[i]
            assert out.logprobs[i] == ref.logprobs[i]


def test_masks_follow_the_matcher_and_allow_eos_when_complete():
    matcher = _matcher("ab")
    logits = torch.zeros(1, WIDTH)
    logits[0, 6] = 100.0  # "x" is by far the most likely, and never allowed
    greedy = SamplingParams(temperature=0.0)
    out = Sampler()(logits, SamplingMetadata.build([_row(greedy, matcher)], WIDTH, CPU))
    assert out.token_ids[0] in (0, 4)
    assert matcher.accept_token(4) and matcher.is_accepting()
    logits[0, 8] = 50.0  # a padding id past the vocabulary: masked too
    out = Sampler()(logits, SamplingMetadata.build([_row(greedy, matcher)], WIDTH, CPU))
    assert out.token_ids == [EOS]
