"""POST /v1/responses: request validation (every bad field a 400 naming it), the translation
into the chat request, and the Response object and typed stream events over a fake engine."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from server.api.responses_request import parse_responses_request
from server.http.errors import HTTPError
from tests.server.api.test_openai_api import CALL, MODEL, api, error_of, wait_for
from tests.server.fake_engine import FakeEngine

FN = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
CALL_ITEM = {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{}"}


def body(**fields):
    return {"model": MODEL, "input": "hi", **fields}


def assert_400(fields: dict, param: str | None, match: str | None = None) -> str:
    with pytest.raises(HTTPError) as info:
        parse_responses_request(body(**fields))
    err = info.value
    assert err.status == 400, err
    assert err.param == param, (err.param, err.message)
    if match is not None:
        assert match in err.message, err.message
    return err.message


# ---- validation --------------------------------------------------------------------------


BAD = [
    ({"input": None}, "input"),
    ({"input": 3}, "input"),
    ({"input": []}, "input"),
    ({"input": ["hi"]}, "input[0]"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user"}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ({"input": [{"role": "user", "content": ["x"]}]}, "input[0].content[0]"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "u"}]}]},
        "input[0].content[0].type",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]},
        "input[0].content[0].type",
    ),
    (
        {
            "input": [
                {"role": "user", "content": "q"},
                {"role": "assistant", "content": [{"type": "input_text", "text": "a"}]},
                {"role": "user", "content": "q"},
            ]
        },
        "input[1].content[0].type",
    ),
    (
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        "input[0].content[0].text",
    ),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    (
        {"input": [{"role": "user", "content": "q"}, {**CALL_ITEM, "call_id": 1}]},
        "input[1].call_id",
    ),
    ({"input": [{"role": "user", "content": "q"}, {**CALL_ITEM, "name": ""}]}, "input[1].name"),
    (
        {"input": [{"role": "user", "content": "q"}, {**CALL_ITEM, "arguments": {}}]},
        "input[1].arguments",
    ),
    (
        {"input": [{"type": "function_call_output", "call_id": "nope", "output": "x"}]},
        "input[0].call_id",
    ),
    (
        {"input": [CALL_ITEM, {"type": "function_call_output", "call_id": "call_1"}]},
        "input[1].output",
    ),
    (
        {"input": [CALL_ITEM, {"type": "function_call_output", "call_id": "call_1", "output": 1}]},
        "input[1].output",
    ),
    ({"input": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, "input"),
    ({"input": [{"role": "user", "content": "q"}, CALL_ITEM]}, "input"),
    ({"instructions": 1}, "instructions"),
    ({"store": True}, "store"),
    ({"store": "no"}, "store"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
    ({"stream": "yes"}, "stream"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"max_output_tokens": "16"}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"user": 5}, "user"),
    ({"metadata": []}, "metadata"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ({"metadata": {"k": "v" * 513}}, "metadata"),
    ({"parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": {}}, "tools"),
    ({"tools": ["f"]}, "tools[0]"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name"),
    ({"tools": [{**FN, "name": 3}]}, "tools[0].name"),
    ({"tools": [{**FN, "parameters": []}]}, "tools[0].parameters"),
    ({"tools": [{**FN, "description": 1}]}, "tools[0].description"),
    ({"tools": [{**FN, "strict": "yes"}]}, "tools[0].strict"),
    ({"tools": [FN], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [FN], "tool_choice": {"type": "function", "name": "other"}}, "tool_choice"),
    ({"tools": [FN], "tool_choice": {"type": "function"}}, "tool_choice"),
    ({"tools": [FN], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"text": "json"}, "text"),
    ({"text": {"format": "json"}}, "text.format"),
    ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": 1}}}, "text.format.schema"),
    (
        {"text": {"format": {"type": "json_schema", "name": "x", "schema": SCHEMA, "strict": 1}}},
        "text.format.strict",
    ),
    (
        {"text": {"format": {"type": "json_object"}}, "tools": [FN], "tool_choice": "required"},
        "text.format",
    ),
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_field_is_a_400_naming_it(fields, param):
    assert_400(fields, param)


def test_not_an_object():
    with pytest.raises(HTTPError) as info:
        parse_responses_request([1])
    assert info.value.status == 400


@pytest.mark.parametrize("field", ["store", "previous_response_id", "conversation"])
def test_stateful_fields_say_the_server_is_stateless(field):
    value = True if field == "store" else "x"
    assert "stateless" in assert_400({field: value}, field)


def test_unknown_item_and_tool_types_are_named():
    assert "'reasoning'" in assert_400({"input": [{"type": "reasoning"}]}, "input[0].type")
    assert "'web_search'" in assert_400({"tools": [{"type": "web_search"}]}, "tools[0].type")
    message = assert_400(
        {"tools": [FN], "tool_choice": {"type": "function", "name": "x"}}, "tool_choice"
    )
    assert "'x'" in message


# ---- translation into the chat request ---------------------------------------------------


def test_string_input_with_instructions():
    req = parse_responses_request(body(instructions="Be brief.", store=False))
    assert req.chat.messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    assert req.chat.tools is None and req.chat.tool_choice == "none"
    assert req.chat.structured is None and not req.chat.stream
    assert req.chat.max_tokens_param == "max_output_tokens"
    assert req.echo["instructions"] == "Be brief." and req.echo["tool_choice"] == "auto"
    assert req.echo["text"] == {"format": {"type": "text"}} and req.echo["metadata"] == {}


def test_items_become_chat_messages():
    items = [
        {"role": "developer", "content": "sys"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {**CALL_ITEM, "arguments": '{"city": "Paris"}', "id": "fc_1", "status": "completed"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]  # fmt: skip
    req = parse_responses_request(body(input=items, tools=[FN], max_output_tokens=7, top_p=0.5))
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
    }
    assert req.chat.messages == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert req.chat.tools == [
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    ]
    assert req.chat.tool_choice == "auto" and req.chat.sampling.max_tokens == 7
    assert req.echo["tools"] == [{**FN, "description": None, "strict": True}]
    assert req.echo["top_p"] == 0.5 and req.echo["max_output_tokens"] == 7


def test_named_tool_choice_constrains_the_output():
    choice = {"type": "function", "name": "get_weather"}
    req = parse_responses_request(body(tools=[FN], tool_choice=choice, parallel_tool_calls=False))
    assert (req.chat.tool_choice, req.chat.tool_name) == ("function", "get_weather")
    assert req.chat.structured is not None and req.chat.structured.param == "tools"
    assert not req.chat.parallel_tool_calls and req.echo["tool_choice"] == choice


def test_text_format_json_schema():
    fmt = {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}
    req = parse_responses_request(body(text={"format": fmt}))
    assert req.chat.structured.param == "text.format"
    assert req.chat.structured.spec.kind == "json_schema"
    assert req.echo["text"] == {"format": fmt}


# ---- the endpoint over a fake engine -----------------------------------------------------


async def typed_events(client: httpx.AsyncClient, payload: dict) -> list[dict]:
    """The stream's events; each `event:` line must name its data's type."""
    events, name = [], None
    async with client.stream("POST", "/v1/responses", json=payload) as r:
        assert r.status_code == 200, await r.aread()
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data = line[len("data: ") :]
                assert data != "[DONE]"
                event = json.loads(data)
                assert event["type"] == name
                events.append(event)
                name = None
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


def test_non_streaming_response():
    @api()
    async def reply(client, state):
        r = await client.post("/v1/responses", json=body(metadata={"k": "v"}, user="u"))
        return r

    assert reply.status_code == 200, reply.text
    resp = reply.json()
    assert resp["id"].startswith("resp_") and resp["object"] == "response"
    assert resp["status"] == "completed" and resp["error"] is None
    assert resp["incomplete_details"] is None and resp["model"] == MODEL
    (item,) = resp["output"]
    assert item["type"] == "message" and item["id"].startswith("msg_")
    assert item["role"] == "assistant" and item["status"] == "completed"
    assert item["content"] == [{"type": "output_text", "text": "Hello world", "annotations": []}]
    usage = resp["usage"]
    assert usage["output_tokens"] == len("Hello world") + 1  # + the end-of-turn token
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"] > 12
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert usage["output_tokens_details"] == {"reasoning_tokens": 0}
    assert resp["metadata"] == {"k": "v"} and resp["user"] == "u" and resp["store"] is False
    assert resp["tools"] == [] and resp["tool_choice"] == "auto" and resp["parallel_tool_calls"]


def test_max_output_tokens_makes_it_incomplete():
    @api()
    async def resp(client, state):
        return (await client.post("/v1/responses", json=body(max_output_tokens=3))).json()

    assert resp["status"] == "incomplete"
    assert resp["incomplete_details"] == {"reason": "max_output_tokens"}
    assert resp["output"][0]["status"] == "incomplete"
    assert resp["output"][0]["content"][0]["text"] == "Hel"
    assert resp["usage"]["output_tokens"] == 3 and resp["max_output_tokens"] == 3


def test_bad_fields_over_http():
    @api()
    async def replies(client, state):
        tools = [FN]
        unknown = {"type": "function", "name": "nope"}
        return [
            await client.post("/v1/responses", json=body(store=True)),
            await client.post("/v1/responses", json=body(tools=tools, tool_choice=unknown)),
            await client.post("/v1/responses", json=body(model="missing")),
            await client.post("/v1/responses", json=body(max_output_tokens=10_000)),
        ]

    store, choice, model, too_long = replies
    assert "stateless" in error_of(store, 400, "store")["message"]
    assert "'nope'" in error_of(choice, 400, "tool_choice")["message"]
    error_of(model, 404, "model")
    assert "maximum context length" in error_of(too_long, 400, "input")["message"]


def test_a_schema_the_compiler_refuses_names_text_format():
    fmt = {"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}}

    @api()
    async def reply(client, state):
        return await client.post("/v1/responses", json=body(text={"format": fmt}))

    assert "uniqueItems" in error_of(reply, 400, "text.format")["message"]


def test_function_call_output_item():
    engine = FakeEngine(CALL)

    @api(engine)
    async def resp(client, state):
        return (await client.post("/v1/responses", json=body(tools=[FN]))).json()

    (item,) = resp["output"]
    assert item["type"] == "function_call" and item["id"].startswith("fc_")
    assert item["call_id"].startswith("call_") and item["name"] == "get_weather"
    assert json.loads(item["arguments"]) == {"city": "Paris"} and item["status"] == "completed"
    assert resp["status"] == "completed"
    assert "Tools:" in engine.tokenizer.decode(engine.calls[0][1])  # the template saw the tools


STREAM_TEXT = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    *["response.output_text.delta"] * len("Hello world"),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_stream_events():
    @api()
    async def events(client, state):
        return await typed_events(client, body(stream=True))

    assert [e["type"] for e in events] == STREAM_TEXT
    created, in_progress = events[0]["response"], events[1]["response"]
    assert created["status"] == in_progress["status"] == "in_progress"
    assert created["output"] == [] and created["usage"] is None
    added = events[2]
    assert added["output_index"] == 0 and added["item"]["content"] == []
    item_id = added["item"]["id"]
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert all(e["item_id"] == item_id and e["content_index"] == 0 for e in deltas)
    assert "".join(e["delta"] for e in deltas) == "Hello world"
    assert events[-4]["text"] == "Hello world"
    done = events[-1]["response"]
    assert done["status"] == "completed" and done["id"] == created["id"]
    assert done["output"] == [events[-2]["item"]]
    assert done["output"][0]["content"][0]["text"] == "Hello world"
    assert done["usage"]["output_tokens"] == len("Hello world") + 1


def test_stream_incomplete():
    @api()
    async def events(client, state):
        return await typed_events(client, body(stream=True, max_output_tokens=2))

    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-2]["item"]["status"] == "incomplete"


def test_stream_function_call():
    @api(FakeEngine(CALL))
    async def events(client, state):
        return await typed_events(client, body(stream=True, tools=[FN]))

    kinds = [e["type"] for e in events]
    num_deltas = kinds.count("response.function_call_arguments.delta")
    assert num_deltas > 1  # the arguments stream as they are generated
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * num_deltas,
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    added, *deltas, done, item_done, completed = events[2:]
    assert added["item"]["arguments"] == "" and added["item"]["status"] == "in_progress"
    assert all(d["item_id"] == done["item_id"] == added["item"]["id"] for d in deltas)
    arguments = "".join(d["delta"] for d in deltas)
    assert json.loads(arguments) == {"city": "Paris"} and arguments == done["arguments"]
    assert item_done["item"]["status"] == "completed"
    assert completed["response"]["output"] == [item_done["item"]]


def test_stream_error_is_an_error_event():
    engine = FakeEngine()
    engine.fail_after_deltas = 2

    @api(engine)
    async def events(client, state):
        return await typed_events(client, body(stream=True))

    last = events[-1]
    assert last["type"] == "error" and "fake engine" in last["message"]
    assert all(e["type"] != "response.completed" for e in events)


def test_text_then_function_call_in_order():
    engine = FakeEngine("Let me check.\n" + CALL)

    @api(engine)
    async def result(client, state):
        plain = (await client.post("/v1/responses", json=body(tools=[FN]))).json()
        events = await typed_events(client, body(tools=[FN], stream=True))
        return plain, events

    plain, events = result
    message, call = plain["output"]
    assert message["content"][0]["text"] == "Let me check." and call["name"] == "get_weather"
    items = [e["item"] for e in events if e["type"] == "response.output_item.done"]
    assert [i["type"] for i in items] == ["message", "function_call"]
    assert [i["output_index"] for i in events if i["type"] == "response.output_item.added"] == [
        0,
        1,
    ]
    # the message is closed before the call's item opens
    types = [e["type"] for e in events]
    assert types.index("response.output_text.done") < types.index(
        "response.function_call_arguments.delta"
    )


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_aborts_and_counts(stream):
    engine = FakeEngine()
    engine.hold = True

    @api(engine)
    async def metrics(client, state):
        reader, writer = await asyncio.open_connection("127.0.0.1", state.server.port)
        data = json.dumps(body(stream=stream)).encode()
        writer.write(
            b"POST /v1/responses HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data)
        )
        await wait_for(lambda: engine.calls)
        writer.close()
        await wait_for(lambda: engine.aborted and not engine.running)
        await wait_for(lambda: not state.server.tasks)
        return (await client.get("/metrics")).text

    assert engine.calls[0][0].startswith("resp_") and engine.calls[0][0] in engine.aborted
    assert 'nanoserve_requests_total{finish_reason="abort"} 1.0' in metrics


def test_metrics_count_finish_reasons():
    @api(FakeEngine(CALL))
    async def metrics(client, state):
        await client.post("/v1/responses", json=body(tools=[FN]))
        await client.post("/v1/responses", json=body(max_output_tokens=2))
        return (await client.get("/metrics")).text

    assert 'nanoserve_requests_total{finish_reason="tool_calls"} 1.0' in metrics
    assert 'nanoserve_requests_total{finish_reason="length"} 1.0' in metrics
