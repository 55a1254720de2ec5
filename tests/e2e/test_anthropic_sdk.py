"""The official `anthropic` SDK against a real server process: /v1/messages and count_tokens.

This SDK's methods take no sampling arguments, so `temperature` travels in extra_body.
"""

from __future__ import annotations

from collections.abc import Iterator

import anthropic
import jsonschema
import pytest

from tests.e2e.conftest import API_KEY, ServerProcess

GREEDY = {"temperature": 0}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}


def sdk(server: ServerProcess, api_key: str | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=server.base_url,
        api_key=api_key or server.api_key or "unused",
        max_retries=0,  # a retried 429 or 5xx would hide what the server answered
        timeout=120.0,  # generous: CI machines have two cores
    )


@pytest.fixture
def claude(server: ServerProcess) -> Iterator[anthropic.Anthropic]:
    with sdk(server) as c:
        yield c


def test_create(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    msg = claude.messages.create(
        model=server.model, max_tokens=16, messages=FRANCE, extra_body=GREEDY, system="Be brief."
    )
    assert isinstance(msg, anthropic.types.Message)
    assert msg.id.startswith("msg_") and msg.role == "assistant" and msg.model == server.model
    (block,) = msg.content
    assert block.type == "text" and block.text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert msg.usage.input_tokens > 0 and 0 < msg.usage.output_tokens <= 16
    if msg.stop_reason == "max_tokens":
        assert msg.usage.output_tokens == 16


def test_stream_matches_create(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    request = {"model": server.model, "max_tokens": 24, "messages": FRANCE, "extra_body": GREEDY}
    with claude.messages.stream(**request) as stream:
        pieces = list(stream.text_stream)
        final = stream.get_final_message()
    assert len(pieces) > 1  # the text came as deltas
    assert "".join(pieces) == final.content[0].text
    plain = claude.messages.create(**request)
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason
    assert final.usage.input_tokens == plain.usage.input_tokens
    assert final.usage.output_tokens == plain.usage.output_tokens


def test_stop_sequence(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    request = {"model": server.model, "max_tokens": 24, "messages": FRANCE, "extra_body": GREEDY}
    text = claude.messages.create(**request).content[0].text
    word = text.split()[1]  # a word the greedy answer writes after its first one
    msg = claude.messages.create(**request, stop_sequences=[word])
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == word
    assert msg.content[0].text == text[: text.index(word)]


def test_tool_use_round_trip(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    msg = claude.messages.create(
        model=server.model,
        max_tokens=64,
        messages=ask,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
        extra_body=GREEDY,  # sampled, the city could run past max_tokens
    )
    assert msg.stop_reason == "tool_use"
    (call,) = [b for b in msg.content if b.type == "tool_use"]
    assert call.name == "get_weather" and call.id.startswith("toolu_")
    jsonschema.validate(call.input, WEATHER["input_schema"])

    result = {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 24 C"}
    answer = claude.messages.create(
        model=server.model,
        max_tokens=24,
        messages=[
            *ask,
            {"role": "assistant", "content": msg.content},
            {"role": "user", "content": [result]},
        ],
        tools=[WEATHER],
        tool_choice={"type": "none"},
    )
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()
    assert answer.stop_reason in ("end_turn", "max_tokens")


def test_streamed_tool_use(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    with claude.messages.stream(
        model=server.model,
        max_tokens=64,
        messages=[{"role": "user", "content": "Weather in Rome?"}],
        tools=[WEATHER],
        tool_choice={"type": "any"},
        extra_body=GREEDY,  # sampled (temperature 1), 3 answers in 40 made a second call
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "input_json" in kinds  # the SDK's event for an input_json_delta
    (call,) = final.content
    assert call.type == "tool_use" and final.stop_reason == "tool_use"
    jsonschema.validate(call.input, WEATHER["input_schema"])


def test_count_tokens(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    request = {"model": server.model, "messages": FRANCE, "system": "Be brief.", "tools": [WEATHER]}
    counted = claude.messages.count_tokens(**request)
    msg = claude.messages.create(**request, max_tokens=1)
    assert counted.input_tokens == msg.usage.input_tokens > 0


def test_bad_requests(claude: anthropic.Anthropic, server: ServerProcess) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model=server.model, max_tokens=8, messages=FRANCE, extra_body={"temperature": 1.5}
        )
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "'temperature'" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(
            model=server.model,
            max_tokens=8,
            messages=FRANCE,
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_time"},
        )
    assert "'get_time'" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="no-such-model", max_tokens=8, messages=FRANCE)
    stream = claude.messages.stream(model=server.model, max_tokens=0, messages=FRANCE)
    with pytest.raises(anthropic.BadRequestError), stream:  # refused before its first event
        pass


def test_api_key(strict_server: ServerProcess) -> None:
    with sdk(strict_server, api_key="sk-wrong") as wrong:
        with pytest.raises(anthropic.AuthenticationError) as info:
            wrong.messages.create(model=strict_server.model, max_tokens=4, messages=FRANCE)
        assert info.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(anthropic.AuthenticationError):
            wrong.messages.count_tokens(model=strict_server.model, messages=FRANCE)
    with sdk(strict_server, api_key=API_KEY) as right:  # the SDK sends it as x-api-key
        msg = right.messages.create(model=strict_server.model, max_tokens=4, messages=FRANCE)
        assert msg.usage.output_tokens > 0
        counted = right.messages.count_tokens(model=strict_server.model, messages=FRANCE)
        assert counted.input_tokens == msg.usage.input_tokens
