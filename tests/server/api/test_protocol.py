"""Request validation: every bad field is a 400 naming it; good bodies parse to dataclasses."""

from __future__ import annotations

import dataclasses

import pytest

from server.api.protocol import (
    parse_chat_request,
    parse_completion_request,
    parse_detokenize_request,
    parse_prompts,
    parse_tokenize_request,
)
from server.http.errors import HTTPError

USER = [{"role": "user", "content": "hi"}]


S = {"type": "integer"}
TOOL_F = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


def chat(**fields):
    return {"model": "m", "messages": USER, **fields}


def completion(**fields):
    return {"model": "m", "prompt": "hi", **fields}


def assert_400(parse, body, param, match=None):
    with pytest.raises(HTTPError) as info:
        parse(body, 16)
    err = info.value
    assert err.status == 400, err
    assert err.param == param, (err.param, err.message)
    if match:
        assert match in err.message


# (fields, param) for fields both endpoints share
COMMON_BAD = [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.1}, "min_p"),
    ({"frequency_penalty": 2.1}, "frequency_penalty"),
    ({"presence_penalty": -2.1}, "presence_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"n": 0}, "n"),
    ({"n": 17}, "n"),
    ({"stop": 3}, "stop"),
    ({"stop": ["a", 1]}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"stop_token_ids": "1"}, "stop_token_ids"),
    ({"seed": "1"}, "seed"),
    ({"seed": 1 << 64}, "seed"),
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": [1]}, "logit_bias"),
    ({"stream": "yes"}, "stream"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage"),
    ({"stream": True, "stream_options": []}, "stream_options"),
    ({"ignore_eos": 1}, "ignore_eos"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
    ({"user": 5}, "user"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {}}},
        "response_format.json_schema.name",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
        "response_format.json_schema.schema",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": 1}}},
        "response_format.json_schema.strict",
    ),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": []}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"structured_outputs": {"choice": [1]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"json": "{"}}, "structured_outputs.json"),
    ({"guided_json": "{"}, "guided_json"),
    ({"guided_json": 5}, "guided_json"),
    ({"guided_regex": 5}, "guided_regex"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_grammar": "root ::= x"}, "guided_grammar"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex"),
    ({"model": 5}, "model"),
]


@pytest.mark.parametrize(("fields", "param"), COMMON_BAD)
def test_chat_bad_field(fields, param):
    assert_400(parse_chat_request, chat(**fields), param)


@pytest.mark.parametrize(("fields", "param"), COMMON_BAD)
def test_completion_bad_field(fields, param):
    assert_400(parse_completion_request, completion(**fields), param)


STRUCTURED_OK = [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, ("json_object", None, "response_format")),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True}}},
        ("json_schema", {}, "response_format"),
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": S}}},
        ("json_schema", S, "response_format"),
    ),
    ({"structured_outputs": {"json": S}}, ("json_schema", S, "structured_outputs")),
    (
        {"structured_outputs": {"json": '{"type": "integer"}'}},
        ("json_schema", S, "structured_outputs"),
    ),
    ({"structured_outputs": {"regex": "a+"}}, ("regex", "a+", "structured_outputs")),
    ({"structured_outputs": {"choice": ["a", "b"]}}, ("choice", ["a", "b"], "structured_outputs")),
    ({"structured_outputs": {"json_object": True}}, ("json_object", None, "structured_outputs")),
    ({"guided_json": S}, ("json_schema", S, "guided_json")),
    ({"guided_regex": "a+"}, ("regex", "a+", "guided_regex")),
    ({"guided_choice": ["a"]}, ("choice", ["a"], "guided_choice")),
]


@pytest.mark.parametrize(("fields", "expected"), STRUCTURED_OK)
@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
def test_structured_fields_parse_into_one_spec(parse, fields, expected):
    body = chat(**fields) if parse is parse_chat_request else completion(**fields)
    structured = parse(body, 16).structured
    if expected is None:
        assert structured is None
    else:
        kind, value, param = expected
        assert (structured.spec.kind, structured.spec.value, structured.param) == expected


CHAT_BAD = [
    ({"messages": []}, "messages"),
    ({"messages": None}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}
            ]
        },
        "messages[0].content[1].type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text",
    ),
    ({"messages": [{"role": "user", "content": ["a"]}]}, "messages[0].content[0]"),
    ({"messages": [{"role": "user", "content": "a", "name": 3}]}, "messages[0].name"),
    (
        {"messages": [{"role": "user", "content": "a", "tool_calls": []}]},
        "messages[0].tool_calls",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": None, "tool_calls": [{"function": {}}]},
                {"role": "tool", "content": "r", "tool_call_id": "c"},
            ]
        },
        "messages[1].tool_calls[0].function",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "a"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {}}}],
                },
                {"role": "tool", "content": "r", "tool_call_id": "c"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    ({"messages": [{"role": "tool", "content": "r"}]}, "messages[0].tool_call_id"),
    ({"messages": [*USER, {"role": "assistant", "content": "x"}]}, "messages"),
    ({"continue_final_message": True}, "continue_final_message"),
    (
        {
            "messages": [*USER, {"role": "assistant", "content": "x"}],
            "continue_final_message": True,
            "add_generation_prompt": True,
        },
        "continue_final_message",
    ),
    ({"logprobs": 1}, "logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"tools": {}}, "tools"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools[0].function.name"),
    (
        {"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]},
        "tools[0].function.parameters",
    ),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    (
        {"tools": [TOOL_F], "tool_choice": {"type": "function", "function": {"name": "g"}}},
        "tool_choice",
    ),
    ({"tools": [TOOL_F], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [TOOL_F], "tool_choice": "required", "guided_regex": "a"}, "guided_regex"),
    ({"parallel_tool_calls": 1}, "parallel_tool_calls"),
    ({"chat_template_kwargs": []}, "chat_template_kwargs"),
]


@pytest.mark.parametrize(("fields", "param"), CHAT_BAD)
def test_chat_bad(fields, param):
    assert_400(parse_chat_request, chat(**fields), param)


COMPLETION_BAD = [
    ({"prompt": None}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": [1, -1]}, "prompt"),
    ({"prompt": [[1], []]}, "prompt"),
    ({"prompt": [[1], [True]]}, "prompt"),
    ({"prompt": [[1], "a"]}, "prompt"),
    ({"logprobs": True}, "logprobs"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"max_tokens": 0, "echo": False}, "max_tokens"),
    ({"max_tokens": -1, "echo": True}, "max_tokens"),
    ({"suffix": "end"}, "suffix"),
    ({"best_of": 2}, "best_of"),
]


@pytest.mark.parametrize(("fields", "param"), COMPLETION_BAD)
def test_completion_bad(fields, param):
    assert_400(parse_completion_request, completion(**fields), param)


PROMPT_LOGPROBS_BAD = [
    ({"prompt_logprobs": -1}, "out of range"),
    ({"prompt_logprobs": 21}, "out of range"),
    ({"prompt_logprobs": 1.5}, "an integer"),
    ({"prompt_logprobs": "1"}, "an integer"),
    ({"prompt_logprobs": True}, "an integer"),
    ({"prompt_logprobs": 1, "stream": True}, "stream"),
]


@pytest.mark.parametrize("parse", [parse_chat_request, parse_completion_request])
@pytest.mark.parametrize(("fields", "match"), PROMPT_LOGPROBS_BAD)
def test_prompt_logprobs_bad(parse, fields, match):
    body = chat(**fields) if parse is parse_chat_request else completion(**fields)
    assert_400(parse, body, "prompt_logprobs", match)


def test_max_tokens_zero_without_echo_says_why():
    assert_400(parse_completion_request, completion(max_tokens=0), "max_tokens", "'echo'")


def test_scoring_requests_parse():
    # lm-evaluation-harness's loglikelihood request
    lm_eval = {"prompt": [[1, 2, 3]], "max_tokens": 1, "logprobs": 1, "echo": True, "seed": 1234}
    req = parse_completion_request(completion(**lm_eval, temperature=0), 16)
    assert req.echo_logprobs and req.prompt_logprobs is None
    assert (req.sampling.logprobs, req.sampling.prompt_logprobs) == (1, 1)
    req = parse_completion_request(completion(max_tokens=0, echo=True), 16)
    assert req.sampling.max_tokens == 0 and req.sampling.prompt_logprobs is None
    req = parse_completion_request(completion(echo=True, logprobs=2, prompt_logprobs=5), 16)
    assert (req.prompt_logprobs, req.sampling.prompt_logprobs) == (5, 5)
    req = parse_completion_request(completion(logprobs=3, prompt_logprobs=0), 16)
    assert not req.echo_logprobs and req.sampling.prompt_logprobs == 0
    req = parse_chat_request(chat(prompt_logprobs=2), 16)
    assert (req.prompt_logprobs, req.sampling.prompt_logprobs) == (2, 2)
    assert parse_chat_request(chat(), 16).sampling.prompt_logprobs is None


def test_completion_max_tokens_defaults_to_16_chat_to_the_context():
    assert parse_completion_request(completion(), 16).sampling.max_tokens == 16
    assert parse_chat_request(chat(), 16).sampling.max_tokens is None


@pytest.mark.parametrize("body", [[], "x", 3, None])
def test_body_must_be_object(body):
    with pytest.raises(HTTPError) as info:
        parse_chat_request(body, 16)
    assert info.value.status == 400
    with pytest.raises(HTTPError):
        parse_completion_request(body, 16)


def test_chat_defaults_and_unknown_fields_ignored():
    req = parse_chat_request(chat(frobnicate=True, metadata={"a": 1}, store=False), 16)
    s = req.sampling
    assert req.model == "m" and not req.stream and not req.include_usage
    assert (s.n, s.max_tokens, s.temperature, s.top_p, s.top_k) == (1, None, 1.0, 1.0, 0)
    assert s.logprobs is None and s.stop == [] and s.logit_bias is None
    assert req.tool_choice == "none" and req.tools is None and not req.parses_tool_calls
    assert req.add_generation_prompt and not req.continue_final_message
    assert req.messages == [{"role": "user", "content": "hi"}]


def test_null_means_default():
    req = parse_chat_request(chat(temperature=None, max_tokens=None, stop=None, n=None), 16)
    assert req.sampling.temperature == 1.0 and req.sampling.n == 1


def test_chat_full_request():
    tools = [{"type": "function", "function": {"name": "get", "parameters": {"type": "object"}}}]
    req = parse_chat_request(
        chat(
            temperature=0,
            top_p=0.5,
            top_k=-1,
            min_p=0.1,
            frequency_penalty=-2,
            presence_penalty=2,
            repetition_penalty=1.2,
            max_tokens=5,
            max_completion_tokens=7,
            n=3,
            stop="END",
            stop_token_ids=[7],
            seed=-5,
            logprobs=True,
            top_logprobs=20,
            logit_bias={"12": -100, "3": 100},
            stream=True,
            stream_options={"include_usage": True},
            ignore_eos=True,
            min_tokens=2,
            user="u",
            response_format={"type": "text"},
            tools=tools,
            chat_template_kwargs={"enable_thinking": False},
        ),
        16,
    )
    s = req.sampling
    assert s.max_tokens == 7 and req.max_tokens_param == "max_completion_tokens"
    assert (s.temperature, s.top_p, s.top_k, s.min_p, s.n) == (0.0, 0.5, -1, 0.1, 3)
    assert s.stop == ["END"] and s.stop_token_ids == [7] and s.seed == -5
    assert s.logprobs == 20 and s.logit_bias == {12: -100.0, 3: 100.0}
    assert req.stream and req.include_usage and s.ignore_eos and s.min_tokens == 2
    assert req.tools == tools and req.tool_choice == "auto" and req.parses_tool_calls
    assert req.chat_template_kwargs == {"enable_thinking": False}
    params = dataclasses.replace(s, max_tokens=9)
    assert params.max_tokens == 9 and params.n == 3 and params.logprobs == 20
    assert params.stop == ["END"] and params.logit_bias == {12: -100.0, 3: 100.0}


def test_chat_logprobs_mapping():
    assert parse_chat_request(chat(logprobs=True), 16).sampling.logprobs == 0
    assert parse_chat_request(chat(logprobs=False), 16).sampling.logprobs is None


def test_messages_normalised_for_template():
    messages = [
        {
            "role": "system",
            "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
        },
        {"role": "developer", "content": "dev"},
        {"role": "user", "content": "q", "name": "bob"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "f", "arguments": '{"x": 1}'},
                }
            ],
        },
        {"role": "tool", "content": "42", "tool_call_id": "call_1"},
    ]
    req = parse_chat_request({"messages": messages}, 16)
    out = req.messages
    assert out[0] == {"role": "system", "content": "a\nb"}
    assert out[1] == {"role": "system", "content": "dev"}  # templates know no "developer"
    assert out[2] == {"role": "user", "content": "q", "name": "bob"}
    assert out[3]["content"] == ""
    assert out[3]["tool_calls"][0]["function"] == {"name": "f", "arguments": {"x": 1}}
    assert out[4] == {"role": "tool", "content": "42", "tool_call_id": "call_1"}
    assert req.model is None


def test_continue_final_message():
    messages = [*USER, {"role": "assistant", "content": "The answer is"}]
    req = parse_chat_request({"messages": messages, "continue_final_message": True}, 16)
    assert req.continue_final_message and not req.add_generation_prompt


def test_tool_choice_none_and_auto():
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert not parse_chat_request(chat(tools=tools, tool_choice="none"), 16).parses_tool_calls
    assert parse_chat_request(chat(tools=tools, tool_choice="auto"), 16).parses_tool_calls


def test_max_n_is_configurable():
    assert parse_chat_request(chat(n=4), 4).sampling.n == 4
    with pytest.raises(HTTPError):
        parse_chat_request(chat(n=5), 4)


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a", ["a"]),
        (["a", "b"], ["a", "b"]),
        ([1, 2], [[1, 2]]),
        ([[1], [2, 3]], [[1], [2, 3]]),
    ],
)
def test_prompt_forms(prompt, expected):
    assert parse_prompts(prompt) == expected


def test_completion_parse():
    req = parse_completion_request(
        completion(prompt=["a", "b"], logprobs=5, echo=False, best_of=2, n=2, suffix=""), 16
    )
    assert req.prompts == ["a", "b"] and req.sampling.logprobs == 5 and req.sampling.n == 2
    assert parse_completion_request(completion(echo=True), 16).echo


def test_tokenize_and_detokenize_requests():
    req = parse_tokenize_request({"prompt": "hi"})
    assert req.prompt == "hi" and req.add_special_tokens and req.messages is None
    req = parse_tokenize_request({"messages": USER, "add_generation_prompt": False})
    assert req.messages == USER and not req.add_special_tokens and not req.add_generation_prompt
    with pytest.raises(HTTPError) as info:
        parse_tokenize_request({})
    assert info.value.param == "prompt"
    assert parse_detokenize_request({"tokens": [1, 2]}).tokens == [1, 2]
    with pytest.raises(HTTPError) as info:
        parse_detokenize_request({"tokens": ["a"]})
    assert info.value.param == "tokens"


def test_tool_choice_required_and_named_build_the_tool_call_spec():
    tool_g = {"type": "function", "function": {"name": "g"}}
    req = parse_chat_request(chat(tools=[TOOL_F, tool_g], tool_choice="required"), 16)
    assert req.tool_choice == "required" and req.parses_tool_calls
    assert req.structured.param == "tools" and req.structured.spec.kind == "sequence"
    assert len(req.structured.spec.value[1]["json_schema"]["anyOf"]) == 2
    named = {"type": "function", "function": {"name": "g"}}
    req = parse_chat_request(chat(tools=[TOOL_F, tool_g], tool_choice=named), 16)
    assert (req.tool_choice, req.tool_name) == ("function", "g")
    branches = req.structured.spec.value[1]["json_schema"]["anyOf"]
    assert [b["properties"]["name"] for b in branches] == [{"const": "g"}]
    auto = parse_chat_request(chat(tools=[TOOL_F], parallel_tool_calls=False), 16)
    assert auto.structured is None and not auto.parallel_tool_calls
    assert auto.tool_names == {"f"}
