"""Sequence token views: the sampler reads the one token list, live (no torch)."""

import pytest

from model.engine.sequence import Sequence


def test_views_follow_the_token_list():
    seq = Sequence([1, 2, 3])
    prompt, output = seq.prompt_view(), seq.output_view()
    assert list(prompt) == [1, 2, 3] and len(output) == 0 and list(output) == []
    seq.append_token(7)
    seq.append_token(8)
    assert list(prompt) == [1, 2, 3] and len(prompt) == 3
    assert len(output) == 2 and list(output) == seq.output_token_ids == [7, 8]
    assert output[0] == 7 and output[-1] == 8 and output[:1] == [7]
    assert prompt[-1] == 3 and 3 in prompt and 3 not in output
    with pytest.raises(IndexError):
        output[2]
    with pytest.raises(IndexError):
        prompt[-4]
