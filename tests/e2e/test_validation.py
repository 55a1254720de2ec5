"""Every request rule of the API against the real server, then the behaviour of the fields
that pass validation (n, logprobs, stop, seed, ...) and the small endpoints."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.e2e.conftest import ServerProcess

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
HI = [{"role": "user", "content": "Hi"}]
DELETE = object()  # in a patch: remove the field
BIG_ID = 10**9  # beyond the 49152-token vocabulary
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


def patched(base: dict, patch: dict) -> dict:
    body = dict(base)
    for key, value in patch.items():
        if value is DELETE:
            body.pop(key, None)
        else:
            body[key] = value
    return body


# Rules shared by both endpoints: (patch, param).
SAMPLING_RULES = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.01}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": -0.1}, "min_p"),
    ({"min_p": 1.1}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"presence_penalty": -3}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": -1}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"max_tokens": 1.5}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),  # --max-n defaults to 16
    ({"n": True}, "n"),
    ({"stop": 5}, "stop"),
    ({"stop": [1, 2]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": "2"}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": [BIG_ID]}, "stop_token_ids"),
    ({"seed": "42"}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": -100.5}}, "logit_bias"),
    ({"logit_bias": {str(BIG_ID): 1}}, "logit_bias"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),  # without stream
    ({"stream": True, "stream_options": "usage"}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"ignore_eos": "no"}, "ignore_eos"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"include_stop_str_in_output": 1}, "include_stop_str_in_output"),
    ({"skip_special_tokens": "no"}, "skip_special_tokens"),
    ({"user": 5}, "user"),
    ({"model": 5}, "model"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        "response_format.json_schema.name",
    ),
    ({"response_format": {"type": "xml"}}, "response_format"),
    (
        {
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
            }
        },
        "response_format",
    ),
    ({"guided_regex": "a("}, "guided_regex"),
    ({"max_tokens": 5000}, None),  # over the context: param is the prompt field, checked below
]

CHAT_RULES = [
    ({"messages": DELETE}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": "Hi"}, "messages"),
    ({"messages": ["Hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": ["Hi"]}]}, "messages[0].content[0]"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages[0].content[0].type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text",
    ),
    ({"messages": [{"role": "user", "content": "Hi", "name": 5}]}, "messages[0].name"),
    ({"messages": [{"role": "user", "content": "Hi", "tool_calls": []}]}, "messages[0].tool_calls"),
    (
        {"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}, *HI]},
        "messages[0].tool_calls[0].function",
    ),
    (
        {
            "messages": [
                {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
                *HI,
            ]
        },
        "messages[0].tool_calls[0].function.arguments",
    ),
    ({"messages": [*HI, {"role": "tool", "content": "21 C"}]}, "messages[1].tool_call_id"),
    ({"messages": [*HI, {"role": "assistant", "content": "Hello"}]}, "messages"),
    ({"continue_final_message": True}, "continue_final_message"),
    (
        {
            "messages": [*HI, {"role": "assistant", "content": "Hel"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        "continue_final_message",
    ),
    ({"add_generation_prompt": "yes"}, "add_generation_prompt"),
    ({"logprobs": "yes"}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]},
        "tools[0].function.parameters",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    (
        {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
        "tool_choice",
    ),
    ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
    ({"parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"chat_template_kwargs": "x"}, "chat_template_kwargs"),
]

COMPLETION_RULES = [
    ({"prompt": DELETE}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [BIG_ID]}, "prompt"),
    ({"prompt": [[1], [BIG_ID]]}, "prompt[1]"),
    ({"prompt": ["Hi", 1]}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"suffix": "!"}, "suffix"),
    ({"best_of": 2}, "best_of"),
    ({"add_special_tokens": "no"}, "add_special_tokens"),
]

CASES = [
    *[pytest.param(CHAT, p, param, id=f"chat-{param}-{i}") for i, (p, param) in enumerate(CHAT_RULES)],
    *[pytest.param(CHAT, p, param, id=f"chat-{param}-s{i}") for i, (p, param) in enumerate(SAMPLING_RULES)],
    *[pytest.param(COMPLETIONS, p, param, id=f"cmpl-{param}-s{i}") for i, (p, param) in enumerate(SAMPLING_RULES)],
    *[pytest.param(COMPLETIONS, p, param, id=f"cmpl-{param}-{i}") for i, (p, param) in enumerate(COMPLETION_RULES)],
]  # fmt: skip


def error_of(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


@pytest.mark.parametrize(("path", "patch", "param"), CASES)
def test_bad_field_is_400_naming_it(http: httpx.Client, path: str, patch: dict, param) -> None:
    base = {"messages": HI} if path == CHAT else {"prompt": "Hi"}
    error = error_of(http.post(path, json=patched(base | {"max_tokens": 1}, patch)), 400)
    assert error["type"] == "invalid_request_error"
    if param is None:  # over the context
        param = "messages" if path == CHAT else "prompt"
    assert error["param"] == param, error


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/tokenize", "/detokenize"])
@pytest.mark.parametrize("body", [b"[]", b'"hi"', b"42", b"null", b"{bad", b"", b"\xff\xfe"])
def test_body_that_is_not_a_json_object(http: httpx.Client, path: str, body: bytes) -> None:
    r = http.post(path, content=body, headers={"Content-Type": "application/json"})
    assert error_of(r, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/tokenize"])
def test_unknown_model_is_404(http: httpx.Client, path: str) -> None:
    body = {"model": "gpt-17", "max_tokens": 1}
    body |= {"messages": HI} if path == CHAT else {"prompt": "Hi"}
    error = error_of(http.post(path, json=body), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "gpt-17" in error["message"]


def test_context_length_message(http: httpx.Client, server: ServerProcess) -> None:
    num_prompt = http.post("/tokenize", json={"messages": HI}).json()["count"]
    error = error_of(http.post(CHAT, json={"messages": HI, "max_tokens": 2040}), 400)
    assert error["param"] == "messages"
    assert (
        "This model's maximum context length is 2048 tokens. However, you requested "
        f"{num_prompt + 2040} tokens ({num_prompt} in the messages, 2040 in the completion)."
    ) in error["message"]
    error = error_of(http.post(COMPLETIONS, json={"prompt": [1] * 2000, "max_tokens": 100}), 400)
    assert error["param"] == "prompt"
    assert (
        "However, you requested 2100 tokens (2000 in the prompt, 100 in the completion)"
        in (error["message"])
    )
    error = error_of(http.post(COMPLETIONS, json={"prompt": [1] * 2048}), 400)
    assert "maximum context length is 2048 tokens" in error["message"]
    # exactly full is fine: prompt + max_tokens == the context
    body = {"messages": HI, "max_tokens": 2048 - num_prompt, "temperature": 0}
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "stop"


def test_unknown_fields_and_nulls_are_ignored(http: httpx.Client) -> None:
    body = {
        "messages": HI,
        "max_tokens": 2,
        "temperature": None,
        "stop": None,
        "frobnicate": {"x": 1},
        "store": True,
        "metadata": {"k": "v"},
        "user": "alice",
        "response_format": {"type": "text"},
        "parallel_tool_calls": False,
    }
    assert http.post(CHAT, json=body).status_code == 200


def test_message_forms(http: httpx.Client) -> None:
    messages = [
        {"role": "developer", "content": "You answer in one word."},
        {"role": "user", "name": "alice", "content": [{"type": "text", "text": "Capital of"}, {"type": "text", "text": "France?"}]},
    ]  # fmt: skip
    r = http.post(CHAT, json={"messages": messages, "max_completion_tokens": 3, "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 3


def test_continue_final_message(http: httpx.Client) -> None:
    messages = [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is"},
    ]
    body = {
        "messages": messages,
        "continue_final_message": True,
        "add_generation_prompt": False,
        "max_tokens": 3,
        "temperature": 0,
    }
    r = http.post(CHAT, json=body)
    assert r.status_code == 200, r.text
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def test_n_choices(http: httpx.Client) -> None:
    body = {"messages": HI, "n": 3, "max_tokens": 4, "temperature": 1.0, "seed": 7}
    r = http.post(CHAT, json=body).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2]
    assert all(c["message"]["role"] == "assistant" for c in r["choices"])
    assert r["usage"]["completion_tokens"] <= 12
    r = http.post(COMPLETIONS, json={"prompt": ["A", "B"], "n": 2, "max_tokens": 2}).json()
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["usage"]["completion_tokens"] == 8
    with http.stream("POST", CHAT, json=body | {"stream": True}) as s:
        chunks = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]


def test_chat_logprobs(http: httpx.Client) -> None:
    body = {"messages": HI, "max_tokens": 3, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    r = http.post(CHAT, json=body).json()
    choice = r["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == r["usage"]["completion_tokens"]
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for entry in content:
        assert entry["logprob"] <= 0
        assert bytes(entry["bytes"]).decode() == entry["token"]
        assert len(entry["top_logprobs"]) == 2
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the best one
        assert entry["top_logprobs"][0]["logprob"] >= entry["top_logprobs"][1]["logprob"]
    r = http.post(CHAT, json=body | {"top_logprobs": 0}).json()
    assert all(e["top_logprobs"] == [] for e in r["choices"][0]["logprobs"]["content"])
    r = http.post(CHAT, json={"messages": HI, "max_tokens": 2}).json()
    assert r["choices"][0]["logprobs"] is None


def test_completion_logprobs(http: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0, "logprobs": 2}
    choice = http.post(COMPLETIONS, json=body).json()["choices"][0]
    lp = choice["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 3
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [0, len(lp["tokens"][0]), len("".join(lp["tokens"][:2]))]
    for token, logprob, top in zip(
        lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True
    ):
        assert logprob <= 0 and top[token] == logprob and 1 <= len(top) <= 3


def test_stop_strings(http: httpx.Client) -> None:
    body = {"prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    full = http.post(COMPLETIONS, json=body).json()["choices"][0]["text"]
    assert "." in full  # " Paris.\n\n..."
    head = full[: full.index(".")]
    choice = http.post(COMPLETIONS, json=body | {"stop": "."}).json()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (head, "stop", ".")
    choice = http.post(COMPLETIONS, json=body | {"stop": ["zzz", "."], "include_stop_str_in_output": True}).json()["choices"][0]  # fmt: skip
    assert choice["text"] == head + "."
    # streamed: the same text, a stop string split across tokens is never half-sent
    with http.stream("POST", COMPLETIONS, json=body | {"stop": [". "], "stream": True}) as s:
        assert s.status_code == 200
        text = "".join(re.findall(r'"text":"((?:[^"\\]|\\.)*)"', "".join(s.iter_lines())))
    assert ". " not in text.replace("\\n", "\n")


def test_stop_token_ids_and_logit_bias(http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": " Paris"}).json()["tokens"]
    assert len(ids) == 1
    body = {"prompt": "The capital of France is", "max_tokens": 4, "temperature": 0}
    choice = http.post(COMPLETIONS, json=body | {"stop_token_ids": ids}).json()["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == ids[0]
    assert choice["text"] == ""
    r = http.post(COMPLETIONS, json=body | {"logit_bias": {str(ids[0]): 100}}).json()
    assert r["choices"][0]["text"] == " Paris" * 4
    r = http.post(COMPLETIONS, json=body | {"logit_bias": {str(ids[0]): -100}}).json()
    assert "Paris" not in r["choices"][0]["text"]


def test_ignore_eos_and_min_tokens(http: httpx.Client) -> None:
    body = {"messages": HI, "max_tokens": 12, "temperature": 0}
    short = http.post(CHAT, json=body | {"max_tokens": 32}).json()
    assert short["choices"][0]["finish_reason"] == "stop"
    n = short["usage"]["completion_tokens"]
    assert n < 12  # "Hello! How can I help you today?"-like
    r = http.post(CHAT, json=body | {"ignore_eos": True}).json()
    assert r["usage"]["completion_tokens"] == 12 and r["choices"][0]["finish_reason"] == "length"
    r = http.post(CHAT, json=body | {"min_tokens": n + 2}).json()
    assert r["usage"]["completion_tokens"] >= n + 2


def test_seed_reproducibility(http: httpx.Client) -> None:
    body = {"prompt": "My favourite animal is", "max_tokens": 6, "temperature": 1.0}
    texts = [http.post(COMPLETIONS, json=body | {"seed": 1234}).json()["choices"][0]["text"] for _ in range(2)]  # fmt: skip
    assert texts[0] == texts[1]
    others = {http.post(COMPLETIONS, json=body | {"seed": s}).json()["choices"][0]["text"] for s in (1, 2, 3)}  # fmt: skip
    assert others - {texts[0]}, "three other seeds all gave the same text"


def test_cached_tokens_on_a_repeated_prompt(http: httpx.Client) -> None:
    prompt = "Here is a long story about a lighthouse keeper. " * 30
    usages = [http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 1}).json()["usage"] for _ in range(2)]  # fmt: skip
    first, second = (u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    num_prompt = usages[1]["prompt_tokens"]
    assert num_prompt > 300
    assert second > first and second >= num_prompt - 16  # all full blocks but the last token's


def test_models_endpoints(http: httpx.Client, server: ServerProcess) -> None:
    listing = http.get("/v1/models").json()
    assert listing["object"] == "list"
    [card] = listing["data"]
    assert card["id"] == server.model and card["object"] == "model"
    assert card["max_model_len"] == 2048
    assert isinstance(card["created"], int) and card["owned_by"]
    assert http.get(f"/v1/models/{server.model}").json() == card
    error = error_of(http.get("/v1/models/gpt-17"), 404)
    assert error["code"] == "model_not_found"


def test_health_and_http_errors(http: httpx.Client, server: ServerProcess) -> None:
    r = http.get("/health")
    assert r.status_code == 200
    assert http.head("/health").status_code == 200
    error_of(http.get("/v1/nothing"), 404)
    r = http.get(CHAT)
    error_of(r, 405)
    assert "POST" in r.headers["allow"]
    # while the model was loading, /health said 503 in the OpenAI error shape
    for status, body in server.startup_health:
        assert status == 503, (status, body)
        assert b'"service_unavailable"' in body


def test_metrics_format(http: httpx.Client) -> None:
    http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2})
    r = http.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    assert text.endswith("\n")
    sample = re.compile(
        r'^[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_]+="[^"]*"(,[a-zA-Z_]+="[^"]*")*\})? \S+$'
    )
    types = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            types[name] = kind
        elif not line.startswith("# HELP "):
            assert sample.match(line), line
            float(line.rsplit(" ", 1)[1])
    for name in (
        "nanoserve_num_requests_running",
        "nanoserve_num_requests_waiting",
        "nanoserve_kv_cache_usage_ratio",
        "nanoserve_prefix_cache_hit_ratio",
    ):
        assert types[name] == "gauge"
    for name in ("nanoserve_prompt_tokens_total", "nanoserve_generation_tokens_total", "nanoserve_requests_total"):  # fmt: skip
        assert types[name] == "counter"
    for name in (
        "nanoserve_time_to_first_token_seconds",
        "nanoserve_inter_token_latency_seconds",
        "nanoserve_e2e_request_latency_seconds",
    ):
        assert types[name] == "histogram"
        assert f'{name}_bucket{{le="+Inf"}}' in text
        count = float(re.search(rf"^{name}_count (\S+)$", text, re.M).group(1))
        inf = float(re.search(rf'^{name}_bucket{{le="\+Inf"}} (\S+)$', text, re.M).group(1))
        assert count == inf > 0


def test_tokenize_and_detokenize(http: httpx.Client) -> None:
    r = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert r["count"] == len(r["tokens"]) == 2 and r["max_model_len"] == 2048
    assert "".join(r["token_strs"]) == "Hello world"
    assert http.post("/detokenize", json={"tokens": r["tokens"]}).json() == {
        "prompt": "Hello world"
    }
    chat = http.post("/tokenize", json={"messages": HI}).json()
    usage = http.post(CHAT, json={"messages": HI, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"]
    text = http.post("/detokenize", json={"tokens": chat["tokens"]}).json()["prompt"]
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    assert error_of(http.post("/tokenize", json={}), 400)["param"] == "prompt"
    assert error_of(http.post("/detokenize", json={"tokens": [BIG_ID]}), 400)["param"] == "tokens"
    assert error_of(http.post("/detokenize", json={"tokens": "1 2"}), 400)["param"] == "tokens"
