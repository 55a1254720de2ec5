"""Request ids through the API (x-request-id -> response and engine ids), readiness, seed range."""

from __future__ import annotations

import asyncio

from tests.server.api.test_openai_api import MODEL, chat_body, error_of, run, serve
from tests.server.fake_engine import FakeEngine


def test_response_and_engine_ids_derive_from_the_request_id():
    async def go():
        engine = FakeEngine()
        async with serve(engine) as (client, _):
            sent = await client.post(
                "/v1/chat/completions", json=chat_body(), headers={"X-Request-Id": "trace-1"}
            )
            made = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x"})
            return sent, made, [call[0] for call in engine.calls]

    sent, made, engine_ids = run(go())
    assert sent.headers["x-request-id"] == "trace-1"
    assert sent.json()["id"].startswith("chatcmpl-trace-1-")
    made_id = made.headers["x-request-id"]
    assert made.json()["id"] == f"cmpl-{made_id}"
    assert engine_ids == [sent.json()["id"], made.json()["id"]]


def test_the_same_client_id_twice_at_once_gets_two_engine_ids():
    async def go():
        engine = FakeEngine()
        engine.hold = True
        async with serve(engine) as (client, _):
            headers = {"X-Request-Id": "same"}
            first, second = (
                asyncio.ensure_future(
                    client.post("/v1/chat/completions", json=chat_body(), headers=headers)
                )
                for _ in range(2)
            )
            while len(engine.calls) < 2:
                await asyncio.sleep(0.01)
            engine.release()
            return await first, await second, [call[0] for call in engine.calls]

    first, second, engine_ids = run(go())
    assert first.status_code == second.status_code == 200
    assert first.headers["x-request-id"] == second.headers["x-request-id"] == "same"
    assert len(set(engine_ids)) == 2
    assert {first.json()["id"], second.json()["id"]} == set(engine_ids)


def test_models_and_model_are_503_with_retry_after_while_loading():
    async def go():
        async with serve(None) as (client, state):
            loading = [await client.get("/v1/models"), await client.get(f"/v1/models/{MODEL}")]
            state.engine = FakeEngine(max_model_len=256)
            ready = await client.get(f"/v1/models/{MODEL}")
            return loading, ready

    loading, ready = run(go())
    for r in loading:
        assert error_of(r, 503)["type"] == "service_unavailable"
        assert r.headers["retry-after"] == "1"
        assert "x-request-id" in r.headers
    assert ready.status_code == 200 and ready.json()["max_model_len"] == 256


def test_seed_out_of_int64_range_says_out_of_range():
    prefix = b'{"model": "fake-model", "messages": [{"role": "user", "content": "hi"}], "seed": '

    async def go():
        async with serve(FakeEngine()) as (client, _):
            return [
                await client.post("/v1/chat/completions", content=prefix + literal + b"}")
                for literal in (
                    b"9223372036854775808",
                    b"18446744073709551616",
                    b"-9223372036854775809",
                )
            ]

    for r in run(go()):
        message = error_of(r, 400, "seed")["message"]
        assert "is out of range [-9223372036854775808, 9223372036854775807]" in message
        assert "expected an integer" not in message
