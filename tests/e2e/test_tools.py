"""Tools on the default model, whose chat template ignores them: the server adds the Hermes
tool prompt, so the model sees the tools and a forced call's round trip keeps its history;
tool calls stream as OpenAI streams them."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai

from tests.e2e.conftest import ServerProcess
from tests.e2e.test_openai_sdk import WEATHER_TOOL

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_the_summary_says_the_tool_prompt_is_added(server: ServerProcess) -> None:
    assert "tools        Hermes tool prompt added by nanoserve" in server.log()


def test_the_prompt_grows_by_the_tool_definitions(
    client: openai.OpenAI, http: httpx.Client, server: ServerProcess
) -> None:
    plain = client.chat.completions.create(model=server.model, messages=QUESTION, max_tokens=1)
    with_tools = client.chat.completions.create(
        model=server.model, messages=QUESTION, max_tokens=1, tools=[WEATHER_TOOL]
    )
    tool_text = json.dumps(WEATHER_TOOL)
    num_tool_tokens = http.post("/tokenize", json={"prompt": tool_text}).json()["count"]
    assert with_tools.usage.prompt_tokens >= plain.usage.prompt_tokens + num_tool_tokens
    # tool_choice "none": the tools are not shown
    none = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        max_tokens=1,
        tools=[WEATHER_TOOL],
        tool_choice="none",
    )
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens


def test_a_forced_call_round_trip_keeps_its_history(
    client: openai.OpenAI, http: httpx.Client, server: ServerProcess
) -> None:
    forced = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=64,
        temperature=0,  # sampled, the arguments could run past max_tokens
    )
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER_TOOL["function"]["parameters"])

    history = [
        *QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21}'},
    ]
    answer = client.chat.completions.create(
        model=server.model, messages=history, tools=[WEATHER_TOOL], max_tokens=16, temperature=0
    )
    assert answer.choices[0].finish_reason in ("stop", "length", "tool_calls")
    # what the model read: the call it made and the result, as text
    r = http.post("/tokenize", json={"messages": history, "tools": [WEATHER_TOOL]})
    prompt = http.post("/detokenize", json={"tokens": r.json()["tokens"]}).json()["prompt"]
    arguments = json.dumps(json.loads(call.function.arguments))  # as templates write them
    assert f'<tool_call>\n{{"name": "get_weather", "arguments": {arguments}}}' in prompt
    assert '<tool_response>\n{"temperature_c": 21}\n</tool_response>' in prompt
    assert answer.usage.prompt_tokens == r.json()["count"]


def test_a_streamed_call_arrives_in_pieces_as_openai_sends_them(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=64,
        temperature=0,  # sampled, a second call could follow (index 1)
        stream=True,
    )
    chunks = list(stream)
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    first, *rest = deltas
    assert first.index == 0 and first.id.startswith("call_") and first.type == "function"
    assert first.function.name == "get_weather"
    assert len(rest) >= 3  # the arguments arrive as they are generated, not in one piece
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in rest)
    arguments = "".join(d.function.arguments or "" for d in deltas)
    jsonschema.validate(json.loads(arguments), WEATHER_TOOL["function"]["parameters"])
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # the SDK's own accumulation gives the same call
    with client.chat.completions.stream(
        model=server.model,
        messages=QUESTION,
        tools=[WEATHER_TOOL],
        tool_choice="required",
        max_tokens=64,
        seed=1,
    ) as sdk_stream:
        names = [e.name for e in sdk_stream if e.type == "tool_calls.function.arguments.done"]
        final = sdk_stream.get_final_completion()
    (call,) = final.choices[0].message.tool_calls
    assert names == ["get_weather"] and call.function.name == "get_weather"
    json.loads(call.function.arguments)
