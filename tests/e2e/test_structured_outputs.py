"""Structured outputs against a real server with the official SDK: parse() into pydantic,
json_object, tool_choice required and named (streaming and not), a LangChain-shaped request."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pydantic

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_openai_sdk import WEATHER_TOOL

ASK = [{"role": "user", "content": "Describe a city as JSON."}]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)
    population: int = pydantic.Field(ge=0, le=100_000_000)
    is_capital: bool


def test_sdk_parse_returns_a_pydantic_object(client: openai.OpenAI, server: ServerProcess) -> None:
    completion = client.beta.chat.completions.parse(
        model=server.model, messages=ASK, response_format=City, max_tokens=100, temperature=0
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, City)


def test_json_object_mode(client: openai.OpenAI, server: ServerProcess) -> None:
    out = client.chat.completions.create(
        model=server.model,
        messages=ASK,
        response_format={"type": "json_object"},
        max_tokens=40,
        n=2,
        seed=3,
        logprobs=True,
    )
    for choice in out.choices:
        assert choice.logprobs is not None and choice.logprobs.content
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"


def test_tool_choice_required_and_named(client: openai.OpenAI, server: ServerProcess) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        out = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice=tool_choice,
            max_tokens=100,
            temperature=0,
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls", choice
        (call,) = choice.message.tool_calls
        assert call.function.name == "get_weather"
        jsonschema.validate(
            json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"]
        )


def test_tool_choice_streams(client: openai.OpenAI, server: ServerProcess) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
        max_tokens=100,
        temperature=0,
        stream=True,
    )
    calls, finish = [], None
    for chunk in stream:
        for choice in chunk.choices:
            calls += choice.delta.tool_calls or []
            finish = choice.finish_reason or finish
    assert finish == "tool_calls"
    # the name comes first, then the arguments in pieces (as OpenAI streams a call)
    assert [c.function.name for c in calls if c.function.name] == ["get_weather"]
    assert {c.index for c in calls} == {0}
    json.loads("".join(c.function.arguments or "" for c in calls))


def test_langchain_shaped_request(server: ServerProcess) -> None:
    """What LangChain's with_structured_output(method="json_schema", strict=True) sends for a
    pydantic model with a nested model: a $defs/$ref schema, strict, additionalProperties off."""

    class Street(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        name: str = pydantic.Field(max_length=12)

    class Place(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")
        city: str = pydantic.Field(max_length=12)
        street: Street

    schema = Place.model_json_schema()
    assert "$defs" in schema
    body = {
        "model": server.model,
        "messages": [{"role": "user", "content": "Where is the Louvre?"}],
        "max_tokens": 40,
        "temperature": 0.7,
        "seed": 4,
        "response_format": {
            "type": "json_schema",
            "json_schema": {
                "name": "Place",
                "description": "a place",
                "schema": schema,
                "strict": True,
            },
        },
    }
    r = httpx.post(
        f"{server.base_url}/v1/chat/completions", json=body, headers=server.headers, timeout=60
    )
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    if choice["finish_reason"] == "stop":
        Place.model_validate_json(choice["message"]["content"])
    else:
        assert choice["finish_reason"] == "length"


def test_vllm_extras_on_completions(server: ServerProcess) -> None:
    url = f"{server.base_url}/v1/completions"
    for extra, check in (
        ({"structured_outputs": {"choice": ["yes", "no"]}}, lambda t: t in ("yes", "no")),
        ({"guided_regex": "[0-9]{3}"}, lambda t: len(t) == 3 and t.isdigit()),
        (
            {"guided_json": {"type": "integer", "minimum": 0, "maximum": 99}},
            lambda t: 0 <= int(t) <= 99,
        ),
    ):
        body = {"model": server.model, "prompt": "Answer:", "max_tokens": 8, **extra}
        r = httpx.post(url, json=body, headers=server.headers, timeout=60)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and check(choice["text"]), choice
