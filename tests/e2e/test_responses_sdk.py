"""The Responses API (`client.responses`) of the official `openai` SDK against a real server:
plain and message-list input, streaming events, max_output_tokens, text.format json_schema,
a function-calling round trip, streamed function-call arguments, stateless errors."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.e2e.conftest import ServerProcess

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
NAMED = {"type": "function", "name": "get_weather"}
CITY = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "population": {"type": "integer", "minimum": 0, "maximum": 100_000_000},
        "is_capital": {"type": "boolean"},
    },
    "required": ["name", "population", "is_capital"],
    "additionalProperties": False,
}


def check_usage(usage) -> None:
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 <= usage.input_tokens_details.cached_tokens <= usage.input_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_string_input(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.responses.create(
        model=server.model, input="What is the capital of France?", max_output_tokens=16
    )
    assert r.id.startswith("resp_") and r.object == "response" and r.model == server.model
    assert r.status in ("completed", "incomplete") and r.error is None
    assert r.output_text.strip()
    (item,) = r.output
    assert item.type == "message" and item.role == "assistant" and item.id.startswith("msg_")
    check_usage(r.usage)
    assert r.usage.output_tokens <= 16 and r.max_output_tokens == 16


def test_instructions_and_message_list(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.responses.create(
        model=server.model,
        instructions="You are a helpful geography assistant.",
        input=[
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "And of Italy?"}],
            },
        ],
        max_output_tokens=16,
        temperature=0,
        store=False,
        metadata={"test": "e2e"},
    )
    assert r.output_text.strip()
    assert r.instructions == "You are a helpful geography assistant."
    assert r.metadata == {"test": "e2e"} and r.temperature == 0
    check_usage(r.usage)


def test_streaming_events(client: openai.OpenAI, server: ServerProcess) -> None:
    stream = client.responses.create(
        model=server.model, input="Name three colours.", max_output_tokens=24, stream=True
    )
    events = list(stream)
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-4:-1] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == final.output_text == events[-4].text
    assert final.id == events[0].response.id and events[0].response.status == "in_progress"
    check_usage(final.usage)


def test_stream_helper_accumulates_the_same_response(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with client.responses.stream(
        model=server.model, input="Say hello.", max_output_tokens=64, temperature=0
    ) as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()  # needs response.completed
    assert text == final.output_text


def test_max_output_tokens_makes_it_incomplete(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    r = client.responses.create(
        model=server.model, input="Tell me a long story about a dragon.", max_output_tokens=2
    )
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.output_tokens == 2 and r.output[0].status == "incomplete"


def test_text_format_json_schema(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.responses.create(
        model=server.model,
        input="Describe a city as JSON.",
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY, "strict": True}},
        max_output_tokens=100,
        temperature=0,
    )
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), CITY)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"


def test_function_call_round_trip(client: openai.OpenAI, server: ServerProcess) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = client.responses.create(
        model=server.model,
        input=ask,
        tools=[WEATHER],
        tool_choice=NAMED,
        max_output_tokens=100,
        temperature=0,
    )
    assert r.status == "completed", r
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert r.tools[0].name == "get_weather" and r.tool_choice.name == "get_weather"

    answer = client.responses.create(
        model=server.model,
        input=[
            *ask,
            *[item.model_dump(exclude_none=True) for item in r.output],
            {"type": "function_call_output", "call_id": call.call_id, "output": "Sunny, 22 C"},
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=24,
        temperature=0,
    )
    assert [item.type for item in answer.output] == ["message"]
    assert answer.output_text.strip()


def test_streamed_function_call_arguments(client: openai.OpenAI, server: ServerProcess) -> None:
    stream = client.responses.create(
        model=server.model,
        input="What is the weather in Rome?",
        tools=[WEATHER],
        tool_choice=NAMED,
        parallel_tool_calls=False,
        max_output_tokens=100,
        temperature=0,
        stream=True,
    )
    events = list(stream)
    types = [e.type for e in events]
    assert "response.function_call_arguments.delta" in types, types
    assert types[-1] == "response.completed"
    deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    (done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    (item,) = events[-1].response.output
    assert deltas == done.arguments == item.arguments
    jsonschema.validate(json.loads(item.arguments), WEATHER["parameters"])


def test_stateless_errors(client: openai.OpenAI, server: ServerProcess) -> None:
    for fields, param in (
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            client.responses.create(model=server.model, input="hi", **fields)
        assert info.value.param == param
