"""The request checks model.sampling_params owns (the API layer and the engine both run them)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from model.errors import RequestRejected
from model.sampling_params import (
    SamplingParams,
    check_min_tokens,
    check_prompt_ids,
    check_token_ids,
    resolve_max_tokens,
)


def rejection(fn, *args) -> RequestRejected:
    with pytest.raises(RequestRejected) as info:
        fn(*args)
    return info.value


def test_resolve_max_tokens_fills_the_rest_of_the_context():
    assert resolve_max_tokens(10, None, 0, 64, "prompt") == 54
    assert resolve_max_tokens(10, 54, 0, 64, "prompt") == 54  # exactly full fits


def test_resolve_max_tokens_context_messages():
    err = rejection(resolve_max_tokens, 10, 55, 0, 64, "messages")
    assert err.param == "messages"
    assert str(err) == (
        "This model's maximum context length is 64 tokens. However, you requested 65 tokens "
        "(10 in the messages, 55 in the completion). Please reduce the length of the messages "
        "or completion."
    )
    err = rejection(resolve_max_tokens, 64, None, 0, 64, "prompt")
    assert err.param == "prompt"
    assert str(err) == (
        "This model's maximum context length is 64 tokens. However, your request has 64 input "
        "tokens. Please reduce the length of the prompt."
    )


def test_min_tokens_checks():
    err = rejection(resolve_max_tokens, 60, None, 5, 64, "prompt")
    assert err.param == "min_tokens" and str(err) == "min_tokens must be <= 4 for this prompt."
    err = rejection(check_min_tokens, 5, 4, "max_completion_tokens")
    assert str(err) == "min_tokens (5) must be <= max_completion_tokens (4)."
    check_min_tokens(5, None)
    with pytest.raises(RequestRejected, match=r"min_tokens \(3\) must be <= max_tokens \(2\)"):
        SamplingParams(max_tokens=2, min_tokens=3)


def test_token_id_checks():
    err = rejection(check_token_ids, [1, 50], 50, "stop_token_ids")
    assert err.param == "stop_token_ids"
    assert str(err) == "Token id 50 in 'stop_token_ids' is out of range [0, 50)."
    assert rejection(check_token_ids, [-1], 50, "prompt").param == "prompt"
    assert str(rejection(check_prompt_ids, [], 50, "prompt[1]")) == "The prompt is empty."
    assert rejection(check_prompt_ids, [], 50, "prompt[1]").param == "prompt[1]"
    check_prompt_ids([0, 49], 50)
    params = SamplingParams(stop_token_ids=[60], logit_bias={70: 1.0})
    assert rejection(params.check_token_ids, 50).param == "stop_token_ids"  # the API's order


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"top_p": 0}, "top_p"), ({"logit_bias": {-1: 1}}, "logit_bias"), ({"seed": 1.5}, "seed")],
)
def test_construction_errors_name_the_field(fields, param):
    with pytest.raises(RequestRejected) as info:
        SamplingParams(**fields)
    assert info.value.param == param


def test_engine_resolve_params_runs_the_same_checks():
    from model.engine.llm_engine import LLMEngine

    engine = SimpleNamespace(model_config=SimpleNamespace(vocab_size=50), max_model_len=16)
    resolved = LLMEngine.resolve_params(engine, [1, 2, 3], SamplingParams())
    assert resolved.max_tokens == 13
    cases = [
        ([], SamplingParams(), "prompt", "The prompt is empty."),
        ([1, 50], SamplingParams(), "prompt", "Token id 50 in 'prompt' is out of range [0, 50)."),
        ([1] * 16, SamplingParams(), "prompt", "However, your request has 16 input tokens."),
        ([1] * 8, SamplingParams(max_tokens=9), "prompt", "(8 in the prompt, 9 in the completion)"),
        ([1] * 14, SamplingParams(min_tokens=3), "min_tokens", "must be <= 2 for this prompt."),
        ([1], SamplingParams(logit_bias={50: 1.0}), "logit_bias", "Token id 50 in 'logit_bias'"),
    ]
    for prompt_ids, params, param, text in cases:
        with pytest.raises(RequestRejected) as info:
            LLMEngine.resolve_params(engine, prompt_ids, params)
        assert info.value.param == param and text in str(info.value), info.value
