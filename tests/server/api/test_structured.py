"""Structured outputs in the API layer: fields -> a grammar compiled before admission, its 400s,
and tool_choice required / named, with the fake engine (no model)."""

from __future__ import annotations

import json

from model.structured import CompiledGrammar, GrammarMatcher
from tests.server.api.test_openai_api import CALL, MODEL, TOOLS, api, chat_body, error_of, sse
from tests.server.fake_engine import IM_END, FakeEngine

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city", "days"],
}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}


def post(path: str, body: dict, engine: FakeEngine | None = None):
    @api(engine)
    async def r(client, state):
        return await client.post(path, json=body)

    return r


def test_json_schema_grammar_reaches_the_engine_and_matches_a_valid_reply():
    reply = '{"city":"Paris","days":3}'
    engine = FakeEngine(reply)
    r = post("/v1/chat/completions", chat_body(response_format=JSON_SCHEMA, n=2), engine)
    assert r.status_code == 200, r.text
    assert [c["message"]["content"] for c in r.json()["choices"]] == [reply, reply]
    params = engine.calls[0][2]
    assert isinstance(params.structured, CompiledGrammar) and params.n == 2
    matcher = GrammarMatcher(params.structured, [IM_END])
    assert all(matcher.accept_token(b) for b in reply.encode())
    assert matcher.is_accepting() and matcher.accept_token(IM_END) and matcher.is_terminated()


def test_the_same_spec_compiles_once():
    engine = FakeEngine("1")
    for _ in range(2):
        r = post("/v1/completions", {"model": MODEL, "prompt": "x", "guided_json": SCHEMA}, engine)
        assert r.status_code == 200, r.text
    assert engine.grammar_compiler().num_compiled == 1
    assert engine.calls[0][2].structured is engine.calls[1][2].structured


def test_unstructured_requests_carry_no_grammar():
    engine = FakeEngine()
    r = post("/v1/chat/completions", chat_body(response_format={"type": "text"}), engine)
    assert r.status_code == 200 and engine.calls[0][2].structured is None


def test_unsupported_keyword_is_400_naming_it():
    schema = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
    body = chat_body(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    )
    err = error_of(post("/v1/chat/completions", body), 400, "response_format")
    assert "uniqueItems" in err["message"]
    body = {"model": MODEL, "prompt": "x", "structured_outputs": {"json": schema}}
    err = error_of(post("/v1/completions", body), 400, "structured_outputs")
    assert "uniqueItems" in err["message"]


def test_bad_regex_and_bad_tool_parameters_are_400():
    err = error_of(post("/v1/chat/completions", chat_body(guided_regex="a(")), 400, "guided_regex")
    assert "regex" in err["message"].lower() or "(" in err["message"]
    tools = [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object", "not": {}}},
        }
    ]
    body = chat_body(tools=tools, tool_choice="required")
    err = error_of(post("/v1/chat/completions", body), 400, "tools")
    assert "'not'" in err["message"]


def test_named_tool_must_be_declared():
    named = {"type": "function", "function": {"name": "other"}}
    error_of(
        post("/v1/chat/completions", chat_body(tools=TOOLS, tool_choice=named)), 400, "tool_choice"
    )
    error_of(post("/v1/chat/completions", chat_body(tool_choice="required")), 400, "tool_choice")


def test_tool_choice_required_returns_tool_calls():
    engine = FakeEngine(CALL)
    r = post("/v1/chat/completions", chat_body(tools=TOOLS, tool_choice="required"), engine)
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    params = engine.calls[0][2]
    matcher = GrammarMatcher(params.structured, [IM_END])
    compact = '<tool_call>{"name":"get_weather","arguments":{"city":"Paris"}}</tool_call>'
    assert all(matcher.accept_token(b) for b in compact.encode()) and matcher.is_terminated()


def test_named_tool_choice_streams_one_call():
    named = {"type": "function", "function": {"name": "get_weather"}}

    @api(FakeEngine(CALL))
    async def chunks(client, state):
        body = chat_body(tools=TOOLS, tool_choice=named, stream=True)
        return await sse(client, "/v1/chat/completions", body)

    calls = [d for c in chunks for ch in c["choices"] for d in ch["delta"].get("tool_calls", [])]
    names = [c["function"]["name"] for c in calls if "name" in c["function"]]
    assert names == ["get_weather"] and {c["index"] for c in calls} == {0}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_keeps_undeclared_calls_as_text():
    text = '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'
    r = post("/v1/chat/completions", chat_body(tools=TOOLS), FakeEngine(text))
    (choice,) = r.json()["choices"]
    assert choice["finish_reason"] == "stop" and choice["message"]["content"] == text
    assert "tool_calls" not in choice["message"]


def test_parallel_tool_calls_false_keeps_one_call():
    r = post(
        "/v1/chat/completions",
        chat_body(tools=TOOLS, parallel_tool_calls=False),
        FakeEngine(CALL + CALL, max_model_len=1024),
    )
    (choice,) = r.json()["choices"]
    assert len(choice["message"]["tool_calls"]) == 1 and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == CALL
