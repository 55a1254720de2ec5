"""The Anthropic Messages endpoints behind the real HTTP server, with the scripted fake engine."""

from __future__ import annotations

import json

import httpx
import pytest

from model.errors import QueueFull
from server.api.handlers import APIState, build_router
from server.http.config import ServerConfig
from server.http.server import HTTPServer
from tests.server.api.test_openai_api import MODEL, run, serve, wait_for
from tests.server.fake_engine import FakeEngine

USER = [{"role": "user", "content": "hi"}]
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
KEY = "sk-test"


def body_of(**fields):
    return {"model": MODEL, "max_tokens": 64, "messages": USER, **fields}


def api(engine=None, **config):
    """Runs `test(client, state)` against a served fake engine; returns its result."""

    def wrap(test):
        async def go():
            if not config:
                async with serve(FakeEngine() if engine is None else engine) as cs:
                    return await test(*cs)
            state = APIState(served_model_names=[MODEL], engine=engine or FakeEngine())
            server = HTTPServer(build_router(state), ServerConfig(port=0, **config))
            state.server = server
            await server.start()
            try:
                url = f"http://127.0.0.1:{server.port}"
                async with httpx.AsyncClient(base_url=url, timeout=10) as client:
                    return await test(client, state)
            finally:
                await server.shutdown()

        return run(go())

    return wrap


async def events_of(client: httpx.AsyncClient, body: dict) -> list[tuple[str, dict]]:
    """(event name, data) of a stream; checks each name is its data's type."""
    events, name = [], None
    async with client.stream("POST", "/v1/messages", json=body) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
                assert name == data["type"], (name, data)
                events.append((name, data))
                name = None
    return events


def anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    """The message of an Anthropic-shaped error with this status and type."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body) == {"type", "error"}, body
    assert set(body["error"]) == {"type", "message"} and body["error"]["type"] == kind, body
    return body["error"]["message"]


def streamed_text(events: list[tuple[str, dict]]) -> str:
    return "".join(
        d["delta"]["text"]
        for name, d in events
        if name == "content_block_delta" and d["delta"]["type"] == "text_delta"
    )


# ---- messages --------------------------------------------------------------------------------


def test_message_shape_and_prompt():
    engine = FakeEngine()

    @api(engine)
    async def r(client, state):
        return await client.post("/v1/messages", json=body_of(system="Be brief.", metadata={}))

    body = r.json()
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    rid, prompt_ids, params = engine.calls[0]
    assert body["id"] == rid and body["id"].startswith("msg_")
    assert body == {
        "id": rid,
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "Hello world"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {"input_tokens": len(prompt_ids), "output_tokens": len("Hello world") + 1},
    }
    assert params.max_tokens == 64 and params.n == 1
    call = engine.tokenizer.template_calls[0]
    assert call["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert call["add_generation_prompt"] and call["tools"] is None


def test_stream_events():
    @api()
    async def events(client, state):
        return await events_of(client, body_of(stream=True))

    names = [name for name, _ in events]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(names[3:-3]) == {"content_block_delta"}
    start = events[0][1]["message"]
    assert start["id"].startswith("msg_") and start["content"] == [] and start["model"] == MODEL
    assert start["stop_reason"] is None and start["usage"]["output_tokens"] == 0
    assert events[2][1]["content_block"] == {"type": "text", "text": ""}
    assert streamed_text(events) == "Hello world"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"] == {"output_tokens": 12}


def test_stop_reasons_and_sampling():
    engine = FakeEngine()

    @api(engine)
    async def result(client, state):
        sampling = {"temperature": 0.5, "top_p": 0.9, "top_k": 7}
        stop = await client.post("/v1/messages", json=body_of(stop_sequences=["wor"], **sampling))
        short = await client.post("/v1/messages", json=body_of(max_tokens=3))
        return stop.json(), short.json()

    stop, short = result
    assert stop["content"] == [{"type": "text", "text": "Hello "}]
    assert (stop["stop_reason"], stop["stop_sequence"]) == ("stop_sequence", "wor")
    assert short["content"][0]["text"] == "Hel" and short["stop_reason"] == "max_tokens"
    params = engine.calls[0][2]
    assert (params.temperature, params.top_p, params.top_k, params.stop) == (0.5, 0.9, 7, ["wor"])


@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}])
def test_forced_tool_use(choice):
    engine = FakeEngine(reply=CALL, max_model_len=1024)

    @api(engine)
    async def result(client, state):
        body = body_of(tools=[WEATHER], tool_choice=choice, max_tokens=128)
        plain = await client.post("/v1/messages", json=body)
        return plain.json(), await events_of(client, {**body, "stream": True})

    plain, events = result
    (block,) = plain["content"]
    assert block["type"] == "tool_use" and block["id"].startswith("toolu_")
    assert (block["name"], block["input"]) == ("get_weather", {"city": "Paris"})
    assert plain["stop_reason"] == "tool_use"
    assert engine.calls[0][2].structured is not None  # the tool-call grammar forces it
    assert (
        engine.tokenizer.template_calls[0]["tools"][0]["function"]["parameters"]
        == (WEATHER["input_schema"])
    )
    start = next(d for name, d in events if name == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["input"] == {}
    partial = [d["delta"] for name, d in events if name == "content_block_delta"]
    assert len(partial) > 1 and {p["type"] for p in partial} == {"input_json_delta"}
    assert json.loads("".join(p["partial_json"] for p in partial)) == {"city": "Paris"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_text_then_tool_call_under_auto():
    engine = FakeEngine(reply="Let me check.\n" + CALL, max_model_len=1024)

    @api(engine)
    async def result(client, state):
        body = body_of(tools=[WEATHER], max_tokens=128)
        plain = await client.post("/v1/messages", json=body)
        return plain.json(), await events_of(client, {**body, "stream": True})

    plain, events = result
    assert [b["type"] for b in plain["content"]] == ["text", "tool_use"]
    assert plain["content"][0]["text"] == "Let me check."
    assert engine.calls[0][2].structured is None
    indexes = [(name, d["index"]) for name, d in events if "index" in d]
    assert indexes[0] == ("content_block_start", 0) and ("content_block_stop", 0) in indexes
    assert ("content_block_start", 1) in indexes and indexes[-1] == ("content_block_stop", 1)


def test_a_call_whose_arguments_are_no_object_stays_text():
    raw = '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>'
    engine = FakeEngine(reply=raw, max_model_len=1024)

    @api(engine)
    async def r(client, state):
        return await client.post("/v1/messages", json=body_of(tools=[WEATHER], max_tokens=128))

    (block,) = r.json()["content"]
    assert block["type"] == "text" and block["text"].startswith("<tool_call>")
    assert json.loads(block["text"][len("<tool_call>") : -len("</tool_call>")]) == {
        "name": "get_weather",
        "arguments": "[1]",
    }
    assert r.json()["stop_reason"] == "end_turn"


def test_tool_round_trip_and_prefill_are_translated():
    engine = FakeEngine(max_model_len=1024)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"c": 1}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "text", "text": "And so?"},
            ],
        },
        {"role": "assistant", "content": "It is"},
    ]

    @api(engine)
    async def r(client, state):
        return await client.post("/v1/messages", json=body_of(messages=messages, tools=[WEATHER]))

    assert r.status_code == 200, r.text
    call = engine.tokenizer.template_calls[0]
    assert call["messages"] == [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {
                    "id": "toolu_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"c": 1}},
                }
            ],
        },
        {"role": "tool", "content": "Sunny", "tool_call_id": "toolu_1", "name": "get_weather"},
        {"role": "user", "content": "And so?"},
        {"role": "assistant", "content": "It is"},
    ]
    assert call["continue_final_message"] and not call["add_generation_prompt"]


def test_count_tokens_matches_the_prompt():
    engine = FakeEngine(max_model_len=1024)

    @api(engine)
    async def result(client, state):
        body = body_of(system="s", tools=[WEATHER])
        counted = await client.post(
            "/v1/messages/count_tokens", json={k: v for k, v in body.items() if k != "max_tokens"}
        )
        await client.post("/v1/messages", json=body)
        bad = await client.post("/v1/messages/count_tokens", json={"model": MODEL})
        return counted, bad

    counted, bad = result
    assert counted.status_code == 200 and counted.json() == {
        "input_tokens": len(engine.calls[0][1])
    }
    assert "'messages'" in anthropic_error(bad, 400, "invalid_request_error")


# ---- validation ------------------------------------------------------------------------------

BLOCK = {"type": "text", "text": "x"}


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_tokens": None}, "'max_tokens' is required"),
        ({"max_tokens": "5"}, "'max_tokens'"),
        ({"max_tokens": 0}, "'max_tokens'"),
        ({"model": 3}, "'model'"),
        ({"temperature": 1.5}, "'temperature'"),
        ({"temperature": "hot"}, "'temperature'"),
        ({"top_p": 0}, "'top_p'"),
        ({"top_k": 1.5}, "'top_k'"),
        ({"stream": "yes"}, "'stream'"),
        ({"metadata": "x"}, "'metadata'"),
        ({"stop_sequences": "END"}, "'stop_sequences'"),
        ({"stop_sequences": [""]}, "'stop_sequences'"),
        ({"system": 5}, "'system'"),
        ({"system": [{"type": "image"}]}, "'system[0].type'"),
        ({"system": [{"type": "text", "text": 1}]}, "'system[0].text'"),
        ({"messages": []}, "'messages'"),
        ({"messages": "hi"}, "'messages'"),
        ({"messages": ["hi"]}, "'messages[0]'"),
        ({"messages": [{"role": "system", "content": "x"}]}, "'messages[0].role'"),
        ({"messages": [{"role": "user"}]}, "'messages[0].content'"),
        ({"messages": [{"role": "user", "content": []}]}, "'messages[0].content'"),
        ({"messages": [{"role": "user", "content": [5]}]}, "'messages[0].content[0]'"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]}, "content[0].type'"),
        ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "content[0].text'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "a"}]}]},
            "'messages[0].content[0].type'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result"}]}]},
            "'messages[0].content[0].tool_use_id' is required",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x"}]}
                ]
            },
            "answers no tool_use block",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "a", "name": "f"}],
                    },
                ]
            },
            "'messages[1].content[0].input'",
        ),
        (
            {"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f"}]}]},
            "'messages[0].content[0].id'",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "q"},
                    {
                        "role": "assistant",
                        "content": [{"type": "tool_use", "id": "a", "name": "f", "input": {}}],
                    },
                ]
            },
            "final assistant message",
        ),
        ({"messages": [{"role": "assistant", "content": [{"type": "thinking"}]}]}, ".type'"),
        ({"tools": {}}, "'tools'"),
        ({"tools": ["x"]}, "'tools[0]'"),
        ({"tools": [{"type": "web_search_20250305", "name": "w"}]}, "'tools[0].type'"),
        ({"tools": [{"input_schema": {}}]}, "'tools[0].name'"),
        ({"tools": [{"name": "f"}]}, "'tools[0].input_schema'"),
        ({"tools": [{"name": "f", "input_schema": []}]}, "'tools[0].input_schema'"),
        ({"tools": [WEATHER, WEATHER]}, "'tools[1].name' repeats"),
        ({"tools": [{**WEATHER, "description": 1}]}, "'tools[0].description'"),
        ({"tool_choice": "auto", "tools": [WEATHER]}, "'tool_choice'"),
        ({"tool_choice": {"type": "some"}, "tools": [WEATHER]}, "'tool_choice.type'"),
        ({"tool_choice": {"type": "any"}}, "needs 'tools'"),
        ({"tool_choice": {"type": "tool"}, "tools": [WEATHER]}, "'tool_choice.name' is required"),
        (
            {"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]},
            "'tool_choice.name' names the tool 'nope', which is not in 'tools'",
        ),
        (
            {"tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}, "tools": [WEATHER]},
            "'tool_choice.disable_parallel_tool_use'",
        ),
        (
            {
                "tool_choice": {"type": "any"},
                "tools": [WEATHER],
                "messages": [
                    {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"},
                ],
            },
            "prefill",
        ),
        (
            {"tools": [{"name": "f", "input_schema": {"type": 5}}], "tool_choice": {"type": "any"}},
            "'tools'",
        ),
    ],
)
def test_bad_fields_are_400_naming_them(fields, named):
    body = {k: v for k, v in {**body_of(), **fields}.items() if v is not None}

    @api()
    async def r(client, state):
        return await client.post("/v1/messages", json=body)

    assert named in anthropic_error(r, 400, "invalid_request_error")


def test_body_that_is_not_an_object_or_not_json():
    @api()
    async def result(client, state):
        array = await client.post("/v1/messages", json=[1])
        broken = await client.post("/v1/messages", content=b"{", headers={"content-type": "x"})
        return array, broken

    array, broken = result
    assert "JSON object" in anthropic_error(array, 400, "invalid_request_error")
    assert "not valid JSON" in anthropic_error(broken, 400, "invalid_request_error")


# ---- errors in Anthropic's shape ---------------------------------------------------------------


def test_handler_errors():
    engine = FakeEngine()

    @api(engine)
    async def result(client, state):
        unknown = await client.post("/v1/messages", json=body_of(model="nope"))
        engine.raise_on_generate = QueueFull("2 requests are already waiting")
        full = await client.post("/v1/messages", json=body_of())
        full_stream = await client.post("/v1/messages", json=body_of(stream=True))
        state.engine = None
        loading = await client.post("/v1/messages", json=body_of())
        counting = await client.post("/v1/messages/count_tokens", json={"messages": USER})
        return unknown, full, full_stream, loading, counting

    unknown, full, full_stream, loading, counting = result
    assert "'nope' does not exist" in anthropic_error(unknown, 404, "not_found_error")
    for r in (full, full_stream):
        anthropic_error(r, 429, "rate_limit_error")
        assert r.headers["retry-after"] == "1"
    for r in (loading, counting):
        anthropic_error(r, 503, "overloaded_error")


def test_http_layer_errors_on_messages_paths():
    @api()
    async def result(client, state):
        wrong_method = await client.get("/v1/messages")
        no_route = await client.post("/v1/messages/nope", json={})
        openai_route = await client.post("/v1/nope", json={})
        return wrong_method, no_route, openai_route

    wrong_method, no_route, openai_route = result
    anthropic_error(wrong_method, 405, "invalid_request_error")
    assert wrong_method.headers["allow"] == "POST"
    anthropic_error(no_route, 404, "not_found_error")
    assert openai_route.status_code == 404 and "message" in openai_route.json()["error"]


def test_api_key_and_body_limit():
    @api(api_key=KEY, max_body_bytes=4096)
    async def result(client, state):
        anthropic_key = await client.post(
            "/v1/messages", json=body_of(), headers={"x-api-key": KEY}
        )
        bearer = await client.post(
            "/v1/messages", json=body_of(), headers={"authorization": f"Bearer {KEY}"}
        )
        wrong = await client.post("/v1/messages", json=body_of(), headers={"x-api-key": "sk-no"})
        missing = await client.post("/v1/messages/count_tokens", json=body_of())
        openai = await client.post("/v1/chat/completions", json={"messages": USER})
        chat_key = await client.post(
            "/v1/chat/completions", json={"messages": USER}, headers={"x-api-key": KEY}
        )
        big = body_of(system="x" * 8192)
        too_big = await client.post("/v1/messages", json=big, headers={"x-api-key": KEY})
        return anthropic_key, bearer, wrong, missing, openai, chat_key, too_big

    anthropic_key, bearer, wrong, missing, openai, chat_key, too_big = result
    assert anthropic_key.status_code == bearer.status_code == chat_key.status_code == 200
    for r in (wrong, missing):
        assert "x-api-key" in anthropic_error(r, 401, "authentication_error")
    assert openai.status_code == 401 and openai.json()["error"]["code"] == "invalid_api_key"
    assert "too large" in anthropic_error(too_big, 413, "invalid_request_error")


def test_engine_failure_mid_stream_is_an_error_event():
    engine = FakeEngine()
    engine.fail_after_deltas = 2

    @api(engine)
    async def result(client, state):
        plain = await client.post("/v1/messages", json=body_of())
        events = await events_of(client, body_of(stream=True))
        return plain, events, (await client.get("/metrics")).text

    plain, events, metrics = result
    anthropic_error(plain, 500, "api_error")
    assert streamed_text(events) == "He"
    name, data = events[-1]
    assert name == "error" and data["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in events]
    assert 'nanoserve_requests_total{finish_reason="error"} 2.0' in metrics


def test_disconnect_mid_stream_aborts():
    engine = FakeEngine()

    @api(engine)
    async def metrics(client, state):
        async with client.stream("POST", "/v1/messages", json=body_of(stream=True)) as r:
            async for line in r.aiter_lines():
                if '"text_delta"' in line:
                    engine.hold = True
                    break
        await wait_for(lambda: engine.aborted and not engine.running)
        await wait_for(lambda: not state.server.tasks)
        return (await client.get("/metrics")).text

    assert engine.calls[0][0] in engine.aborted
    assert 'nanoserve_requests_total{finish_reason="abort"} 1.0' in metrics


def test_metrics_count_messages_like_chat():
    @api()
    async def metrics(client, state):
        await client.post("/v1/messages", json=body_of())
        await client.post("/v1/messages", json=body_of(max_tokens=2))
        return (await client.get("/metrics")).text

    assert 'nanoserve_requests_total{finish_reason="stop"} 1.0' in metrics
    assert 'nanoserve_requests_total{finish_reason="length"} 1.0' in metrics
