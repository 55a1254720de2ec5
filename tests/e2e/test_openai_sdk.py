"""The official `openai` SDK, sync and async, against a real server process."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY, ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}


def check_usage(usage, completion_tokens: int | None = None) -> None:
    assert usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert 0 <= usage.prompt_tokens_details.cached_tokens <= usage.prompt_tokens
    if completion_tokens is not None:
        assert usage.completion_tokens == completion_tokens


# ---- sync ----------------------------------------------------------------------------------


def test_chat(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.chat.completions.create(
        model=server.model, messages=FRANCE, max_tokens=16, temperature=0
    )
    assert r.id.startswith("chatcmpl-")
    assert r.object == "chat.completion"
    assert r.model == server.model
    assert r.system_fingerprint
    assert len(r.choices) == 1
    choice = r.choices[0]
    assert choice.index == 0
    assert choice.message.role == "assistant"
    assert "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert choice.message.tool_calls is None
    check_usage(r.usage)
    assert 1 <= r.usage.completion_tokens <= 16


def test_chat_model_defaults_to_the_served_one(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    # The SDK insists on `model`; the raw API does not, and answers with the served name.
    r = client.post(
        "/chat/completions",
        body={"messages": FRANCE, "max_tokens": 2},
        cast_to=openai.types.chat.ChatCompletion,
    )
    assert r.model == server.model


def test_chat_stream(client: openai.OpenAI, server: ServerProcess) -> None:
    stream = client.chat.completions.create(
        model=server.model,
        messages=FRANCE,
        max_tokens=16,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first = chunks[0].choices[0]
    assert first.delta.role == "assistant" and first.delta.content == ""
    *body, finish, usage = chunks
    assert finish.choices[0].finish_reason in ("stop", "length")
    assert usage.choices == [] and usage.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in body)
    assert "Paris" in text
    check_usage(usage.usage)
    # one content chunk per token here: the test reads as fast as the server writes
    assert sum(1 for c in body[1:] if c.choices[0].delta.content) >= 2


def test_completion(client: openai.OpenAI, server: ServerProcess) -> None:
    r = client.completions.create(
        model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert r.id.startswith("cmpl-")
    assert r.object == "text_completion"
    assert r.model == server.model
    assert "Paris" in r.choices[0].text
    assert r.choices[0].finish_reason in ("stop", "length")
    check_usage(r.usage)


def test_completion_stream(client: openai.OpenAI, server: ServerProcess) -> None:
    stream = client.completions.create(
        model=server.model,
        prompt="The capital of France is",
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    with stream:
        chunks = list(stream)
    assert all(c.object == "text_completion" for c in chunks)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    text = "".join(c.choices[0].text for c in chunks[:-1])
    assert "Paris" in text
    assert chunks[-2].choices[0].finish_reason == "length"


def test_completion_prompt_forms(
    client: openai.OpenAI, server: ServerProcess, http: httpx.Client
) -> None:
    def tokenize(text: str) -> list[int]:
        return http.post("/tokenize", json={"prompt": text}).json()["tokens"]

    kwargs = dict(model=server.model, max_tokens=4, temperature=0)
    ids = tokenize("The capital of France is")
    by_text = client.completions.create(prompt="The capital of France is", **kwargs)
    by_ids = client.completions.create(prompt=ids, **kwargs)
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == by_text.usage.prompt_tokens == len(ids)
    other = tokenize("Hello, my name is")
    many = client.completions.create(prompt=[ids, other], **kwargs)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == by_text.choices[0].text
    assert many.usage.prompt_tokens == len(ids) + len(other)
    strings = client.completions.create(prompt=["The capital of France is", "Hi"], **kwargs)
    assert strings.choices[0].text == by_text.choices[0].text
    echo = client.completions.create(prompt="The capital of France is", echo=True, **kwargs)
    assert echo.choices[0].text == "The capital of France is" + by_text.choices[0].text


def test_models(client: openai.OpenAI, server: ServerProcess) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]
    model = client.models.retrieve(server.model)
    assert model.id == server.model and model.object == "model"
    assert model.owned_by


def test_tools_auto_returns_content_or_tool_calls(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    messages = [{"role": "user", "content": "What is the weather like in Paris today?"}]
    r = client.chat.completions.create(
        model=server.model,
        messages=messages,
        tools=[WEATHER_TOOL],
        tool_choice="auto",
        max_tokens=32,
        temperature=0,
    )
    choice = r.choices[0]
    if choice.message.tool_calls:  # the 135M model may or may not call the tool
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            assert call.function.name
            json.loads(call.function.arguments)
    else:
        assert isinstance(choice.message.content, str) and choice.message.content
        assert choice.finish_reason in ("stop", "length")
    # streamed, the same answer arrives as content deltas or tool-call deltas
    stream = client.chat.completions.create(
        model=server.model,
        messages=messages,
        tools=[WEATHER_TOOL],
        max_tokens=32,
        temperature=0,
        stream=True,
    )
    with stream:
        chunks = [c for c in stream if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    deltas = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    names = [t.function.name for t in deltas if t.function.name]
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    assert names == [t.function.name for t in choice.message.tool_calls or []]
    assert content == (choice.message.content or "")


def test_tool_result_conversation(client: openai.OpenAI, server: ServerProcess) -> None:
    messages = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature_c": 21}'},
    ]
    r = client.chat.completions.create(
        model=server.model, messages=messages, tools=[WEATHER_TOOL], max_tokens=8
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


# ---- errors mapped to the SDK's exception classes ------------------------------------------


def test_bad_request_names_the_param(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=FRANCE, temperature=3)
    assert info.value.status_code == 400
    assert info.value.param == "temperature"
    assert info.value.type == "invalid_request_error"


def test_tool_choice_naming_an_undeclared_tool_is_rejected(
    client: openai.OpenAI, server: ServerProcess
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=server.model,
            messages=FRANCE,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )
    assert info.value.param == "tool_choice"


def test_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-17", messages=FRANCE, max_tokens=1)
    assert info.value.code == "model_not_found" and info.value.param == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="hi", max_tokens=1)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")


def test_context_length_error(client: openai.OpenAI, server: ServerProcess) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=server.model, messages=FRANCE, max_tokens=5000)
    assert "maximum context length is 2048 tokens" in info.value.message


def test_api_key(strict_server: ServerProcess) -> None:
    with strict_server.openai(api_key="wrong") as c, pytest.raises(openai.AuthenticationError):
        c.models.list()
    with strict_server.openai() as c:
        assert c.api_key == API_KEY
        assert [m.id for m in c.models.list().data] == [strict_server.model]
        r = c.chat.completions.create(
            model=strict_server.model, messages=FRANCE, max_tokens=2, temperature=0
        )
        assert r.choices[0].message.content


def test_api_key_over_raw_http(strict_server: ServerProcess) -> None:
    url = strict_server.base_url
    with httpx.Client(base_url=url, timeout=30) as http:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": API_KEY}):
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401
            assert r.headers["www-authenticate"] == "Bearer"
            assert r.json()["error"]["type"] == "authentication_error"
        # a key that is not ASCII is refused like any wrong key, not a server error
        r = http.get(
            "/v1/models", headers={"Authorization": "Bearer schl\xfcssel".encode("latin-1")}
        )
        assert r.status_code == 401
        # the probes need no key
        assert http.get("/health").status_code == 200
        assert http.get("/metrics").status_code == 200


def test_body_too_large(strict_server: ServerProcess) -> None:
    with strict_server.openai() as c, pytest.raises(openai.APIStatusError) as info:
        c.chat.completions.create(
            model=strict_server.model,
            messages=[{"role": "user", "content": "x" * (2 << 20)}],
            max_tokens=1,
        )
    assert info.value.status_code == 413


def test_queue_full_is_rate_limited(strict_server: ServerProcess) -> None:
    """One sequence runs, two wait (the server's limit); the next request gets 429."""
    body = {
        "model": strict_server.model,
        "messages": FRANCE,
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
    }
    with strict_server.http() as http, http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        num_content = 0
        while num_content < 2:  # the running request has output: it no longer counts as queued
            line = next(lines)
            num_content += '"content":"' in line and '"content":""' not in line
        waiting = [strict_server.connect() for _ in range(2)]
        try:
            payload = json.dumps(body).encode()
            for sock in waiting:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    b"Content-Type: application/json\r\n"
                    + f"Authorization: Bearer {API_KEY}\r\n".encode()
                    + f"Content-Length: {len(payload)}\r\n\r\n".encode()
                    + payload
                )
            for _ in range(200):
                if strict_server.metrics()["nanoserve_num_requests_waiting"] >= 2:
                    break
                time.sleep(0.05)
            with strict_server.openai() as c, pytest.raises(openai.RateLimitError) as info:
                c.chat.completions.create(model=strict_server.model, messages=FRANCE, max_tokens=1)
            assert info.value.status_code == 429
            assert info.value.response.headers["retry-after"]
        finally:
            for sock in waiting:
                sock.close()
    strict_server.wait_idle(10)


# ---- async ---------------------------------------------------------------------------------


def test_async_client(server: ServerProcess) -> None:
    async def main() -> None:
        async with server.async_openai() as c:
            chat = await c.chat.completions.create(
                model=server.model, messages=FRANCE, max_tokens=16, temperature=0
            )
            assert "Paris" in chat.choices[0].message.content
            stream = await c.chat.completions.create(
                model=server.model, messages=FRANCE, max_tokens=16, temperature=0, stream=True
            )
            async with stream:
                text = "".join([ch.choices[0].delta.content or "" async for ch in stream])
            assert text == chat.choices[0].message.content
            completion = await c.completions.create(
                model=server.model, prompt="The capital of France is", max_tokens=8, temperature=0
            )
            assert "Paris" in completion.choices[0].text
            stream = await c.completions.create(
                model=server.model,
                prompt="The capital of France is",
                max_tokens=8,
                temperature=0,
                stream=True,
            )
            async with stream:
                text = "".join([ch.choices[0].text async for ch in stream])
            assert text == completion.choices[0].text
            with pytest.raises(openai.BadRequestError) as info:
                await c.completions.create(model=server.model, prompt="hi", top_p=0)
            assert info.value.param == "top_p"
            with pytest.raises(openai.NotFoundError):
                await c.chat.completions.create(model="nope", messages=FRANCE)

    asyncio.run(main())
