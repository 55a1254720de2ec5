"""Prompt scoring against the real server: lm-evaluation-harness's exact loglikelihood request,
max_tokens 0, streaming echo, and vLLM's prompt_logprobs, each checked against HF transformers'
log_softmax on the same weights."""

from __future__ import annotations

from operator import itemgetter

import httpx
import openai
import pytest
import torch

from tests.e2e.conftest import ServerProcess
from tests.model.engine.test_prompt_logprobs import hf_logprobs

ATOL = 1e-4
CONTEXT = (
    "The following are multiple choice questions about geography.\n\n"
    "Question: What is the capital of France?\nAnswer:"
)
CONTINUATIONS = [" Paris", " London", " the city of Rome"]


def tokenize(http: httpx.Client, text: str) -> list[int]:
    r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
    return r.json()["tokens"]


def parse_logprobs(outputs, tokens=None, ctxlens=None, **kwargs):
    """lm_eval/models/openai_completions.py LocalCompletionsAPI.parse_logprobs (zip made
    explicit for the linter)."""
    res = []
    if not isinstance(outputs, list):
        outputs = [outputs]
    for out in outputs:
        for choice, ctxlen in zip(
            sorted(out["choices"], key=itemgetter("index")), ctxlens, strict=False
        ):
            assert ctxlen > 0, "Context length must be greater than 0"
            logprobs = sum(choice["logprobs"]["token_logprobs"][ctxlen:-1])
            tokens_logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
            top_logprobs = choice["logprobs"]["top_logprobs"][ctxlen:-1]
            is_greedy = True
            for tok, top in zip(tokens_logprobs, top_logprobs, strict=False):
                if tok != max(top.values()):
                    is_greedy = False
                    break
            res.append((logprobs, is_greedy))
    return res


def hf_loglikelihood(hf_model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    ids = context + continuation
    rows = hf_logprobs(hf_model, ids)[len(context) - 1 :]
    scores = rows[torch.arange(len(continuation)), torch.tensor(continuation)]
    return scores.sum().item(), bool((rows.argmax(dim=-1) == torch.tensor(continuation)).all())


def lm_eval_request(server: ServerProcess, prompts: list[list[int]]) -> dict:
    """What local-completions posts for a batch of loglikelihood requests."""
    return {
        "model": server.model,
        "prompt": prompts,
        "temperature": 0,
        "max_tokens": 1,
        "logprobs": 1,
        "seed": 1234,
        "echo": True,
    }


def test_lm_eval_loglikelihood_matches_hf(server: ServerProcess, http: httpx.Client, hf_model):
    context = tokenize(http, CONTEXT)
    assert len(context) > 16  # more than a KV block: later requests can hit the prefix cache
    continuations = [tokenize(http, CONTEXT + c)[len(context) :] for c in CONTINUATIONS]
    # HF's own greedy next two tokens too, so that is_greedy is True for one of them.
    greedy = hf_logprobs(hf_model, context + [0])[-1].argmax().item()
    greedy = [greedy, hf_logprobs(hf_model, context + [greedy, 0])[-1].argmax().item()]
    continuations.append(greedy)
    prompts = [context + c for c in continuations]
    ctxlens = [len(context)] * len(prompts)
    expected = [hf_loglikelihood(hf_model, context, c) for c in continuations]
    assert expected[-1][1] and not all(g for _, g in expected)
    # One batch as lm-eval sends it, then one request each: the context is then a prefix-cache
    # hit, and scoring must still compute its logits.
    batch = http.post("/v1/completions", json=lm_eval_request(server, prompts))
    assert batch.status_code == 200, batch.text
    singles = [
        http.post("/v1/completions", json=lm_eval_request(server, [p])).json() for p in prompts
    ]
    got_batch = parse_logprobs(batch.json(), prompts, ctxlens)
    got_singles = [
        parse_logprobs(s, [p], ctxlens[:1])[0] for s, p in zip(singles, prompts, strict=True)
    ]
    for got in (got_batch, got_singles):
        for (logprob, is_greedy), (ref_logprob, ref_greedy) in zip(got, expected, strict=True):
            assert logprob == pytest.approx(ref_logprob, abs=ATOL * 4)
            assert is_greedy == ref_greedy
    for single in singles:
        assert single["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # The whole echoed prompt, token by token.
    choice = singles[0]["choices"][0]
    rows = hf_logprobs(hf_model, prompts[0])
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompts[0]) + 1  # the prompt and the one sampled token
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for i, token_id in enumerate(prompts[0][1:]):
        assert lp["token_logprobs"][i + 1] == pytest.approx(rows[i, token_id].item(), abs=ATOL)
    assert choice["text"].startswith(CONTEXT)
    assert lp["text_offset"][: len(prompts[0])] == [
        sum(len(t) for t in lp["tokens"][:i]) for i in range(len(prompts[0]))
    ]


def test_max_tokens_zero_scores_only(client: openai.OpenAI, server: ServerProcess, http, hf_model):
    ids = tokenize(http, CONTEXT + CONTINUATIONS[0])
    r = client.completions.create(
        model=server.model, prompt=ids, max_tokens=0, echo=True, logprobs=2, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 0
    assert choice.text == CONTEXT + CONTINUATIONS[0]
    rows = hf_logprobs(hf_model, ids)
    assert len(choice.logprobs.token_logprobs) == len(ids)
    for i, token_id in enumerate(ids[1:]):
        assert choice.logprobs.token_logprobs[i + 1] == pytest.approx(
            rows[i, token_id].item(), abs=ATOL
        )
        assert len(choice.logprobs.top_logprobs[i + 1]) in (2, 3)  # top-2, plus the token


def test_streamed_echo_logprobs_arrive_in_the_first_chunk(
    client: openai.OpenAI, server: ServerProcess, http: httpx.Client
):
    ids = tokenize(http, CONTEXT)
    body = {**lm_eval_request(server, [ids]), "max_tokens": 3}
    plain = http.post("/v1/completions", json=body).json()["choices"][0]
    with client.completions.create(**body, stream=True) as stream:
        chunks = [c for c in stream if c.choices]
    first = chunks[0].choices[0]
    assert first.text.startswith(CONTEXT)
    assert first.logprobs.tokens[: len(ids)] == plain["logprobs"]["tokens"][: len(ids)]
    assert first.logprobs.token_logprobs[0] is None
    assert "".join(c.choices[0].text for c in chunks) == plain["text"]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [t for lp in streamed for t in lp.token_logprobs] == plain["logprobs"]["token_logprobs"]


def assert_vllm_shape_matches_hf(prompt_logprobs: list, ids: list[int], hf_model, k: int):
    assert len(prompt_logprobs) == len(ids) and prompt_logprobs[0] is None
    rows = hf_logprobs(hf_model, ids)
    for i, (token_id, entry) in enumerate(zip(ids[1:], prompt_logprobs[1:], strict=True)):
        row = rows[i]
        actual = entry[str(token_id)]  # the actual token is always listed
        assert actual["logprob"] == pytest.approx(row[token_id].item(), abs=ATOL)
        assert actual["decoded_token"]
        assert int((row > actual["logprob"] + ATOL).sum()) + 1 <= actual["rank"]
        assert actual["rank"] <= int((row > actual["logprob"] - ATOL).sum())
        values, top_ids = torch.topk(row, k)
        for value, top_id in zip(values.tolist(), top_ids.tolist(), strict=True):
            listed = entry.get(str(top_id))
            if listed is not None:  # a near-tie may list its twin instead
                assert listed["logprob"] == pytest.approx(value, abs=ATOL)
        assert len(entry) in (k, k + 1)


def test_vllm_prompt_logprobs_match_hf(
    client: openai.OpenAI, server: ServerProcess, http: httpx.Client, hf_model
):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model=server.model, messages=messages, max_tokens=1, extra_body={"prompt_logprobs": 2}
    ).model_dump()
    chat_ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    assert chat["usage"]["prompt_tokens"] == len(chat_ids)
    assert_vllm_shape_matches_hf(chat["prompt_logprobs"], chat_ids, hf_model, 2)
    ids = tokenize(http, CONTEXT)
    completion = client.completions.create(
        model=server.model, prompt=ids, max_tokens=1, n=2, extra_body={"prompt_logprobs": 1}
    ).model_dump()
    for choice in completion["choices"]:
        assert_vllm_shape_matches_hf(choice["prompt_logprobs"], ids, hf_model, 1)
    plain = client.completions.create(model=server.model, prompt=ids, max_tokens=1).model_dump()
    assert plain["choices"][0].get("prompt_logprobs") is None


def test_completions_default_to_16_tokens(client: openai.OpenAI, server: ServerProcess):
    r = client.completions.create(
        model=server.model,
        prompt="Once upon a time",
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 16 and r.choices[0].finish_reason == "length"
