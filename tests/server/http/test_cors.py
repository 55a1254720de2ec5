"""CORS: the sans-I/O policy, preflights and the headers on every kind of response."""

from __future__ import annotations

import asyncio

from server.http.cors import ALL_METHODS, CORSPolicy
from server.http.errors import HTTPError
from server.http.sse import EventSourceResponse
from tests.server.helpers import BytesReader, Client, ServerThread, fast_config, request_bytes
from tests.server.http.test_http_protocol import open_connection, run, settle, simple_router

ORIGIN = "https://app.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "Authorization, Content-Type",
}


def exchange(raw: bytes, config=None, router=None, wait_s: float = 0.0):
    async def main():
        _, proto, t = open_connection(router or simple_router(), config)
        proto.data_received(raw)
        await settle()
        if wait_s:
            await asyncio.sleep(wait_s)
        return BytesReader(t.take()).read_all()

    return run(main())


def only(raw: bytes, **kwargs):
    replies = exchange(raw, **kwargs)
    assert len(replies) == 1, replies
    return replies[0]


# ---- the policy, sans-I/O


def test_policy_any_origin():
    policy = CORSPolicy(["*"], ["*"], ["*"])
    assert policy.response_head(None) == b""
    head = policy.response_head(ORIGIN)
    assert b"access-control-allow-origin: *\r\n" in head
    assert b"access-control-expose-headers: x-request-id, retry-after\r\n" in head
    headers, failure = policy.preflight({"origin": ORIGIN, "access-control-request-method": "POST"})
    assert failure is None
    assert dict(headers)["access-control-allow-methods"] == ", ".join(ALL_METHODS)
    assert "access-control-allow-headers" not in dict(headers)  # none were asked for


def test_policy_origin_list():
    policy = CORSPolicy([ORIGIN], ["GET", "post"], ["authorization"])
    assert policy.response_head("https://evil.example") == b""
    head = policy.response_head(ORIGIN)
    assert b"access-control-allow-origin: https://app.example\r\nvary: Origin\r\n" in head
    request = {"origin": ORIGIN, "access-control-request-method": "POST"}
    headers, failure = policy.preflight(
        {**request, "access-control-request-headers": "Authorization"}
    )
    assert failure is None
    found = dict(headers)
    assert found["access-control-allow-origin"] == ORIGIN and found["vary"] == "Origin"
    assert found["access-control-allow-methods"] == "GET, POST"
    assert "authorization" in found["access-control-allow-headers"]
    assert policy.preflight({**request, "access-control-request-method": "PUT"})[1] == (
        "Disallowed CORS method"
    )
    assert policy.preflight({**request, "access-control-request-headers": "x-other"})[1] == (
        "Disallowed CORS headers"
    )
    headers, failure = policy.preflight({**request, "origin": "https://evil.example"})
    assert failure == "Disallowed CORS origin"
    assert "access-control-allow-origin" not in dict(headers)


# ---- preflights


def test_preflight_is_204_with_allow_headers():
    reply = only(request_bytes("OPTIONS", "/m", headers=PREFLIGHT))
    assert reply.status == 204 and reply.body == b""
    assert reply.headers["access-control-allow-origin"] == "*"
    assert reply.headers["access-control-allow-methods"] == ", ".join(ALL_METHODS)
    # "*" does not cover Authorization in browsers: the requested headers are echoed.
    assert reply.headers["access-control-allow-headers"] == "authorization, content-type"
    assert reply.headers["access-control-max-age"] == "600"
    assert "x-request-id" in reply.headers


def test_preflight_needs_no_api_key_and_no_route():
    config = fast_config(api_key="sekret")
    for path in ("/m", "/v1/chat/completions", "/unknown"):
        reply = only(request_bytes("OPTIONS", path, headers=PREFLIGHT), config=config)
        assert reply.status == 204, (path, reply)
    # Not a preflight (no Access-Control-Request-Method): routed and authenticated as usual.
    reply = only(request_bytes("OPTIONS", "/m", headers={"Origin": ORIGIN}), config=config)
    assert reply.status == 401
    assert reply.headers["access-control-allow-origin"] == "*"


def test_preflight_from_a_disallowed_origin_is_400_without_allow_origin():
    config = fast_config(allowed_origins=(ORIGIN,))
    headers = {**PREFLIGHT, "Origin": "https://evil.example"}
    reply = only(request_bytes("OPTIONS", "/m", headers=headers), config=config)
    assert reply.status == 400
    assert "access-control-allow-origin" not in reply.headers
    assert reply.json()["error"]["message"] == "Disallowed CORS origin"
    reply = only(request_bytes("OPTIONS", "/m", headers=PREFLIGHT), config=config)
    assert reply.status == 204
    assert reply.headers["access-control-allow-origin"] == ORIGIN
    assert reply.headers["vary"] == "Origin"


def test_preflight_over_a_real_socket_with_an_api_key():
    with ServerThread(simple_router(), fast_config(api_key="sekret")) as srv, Client(srv.port) as c:
        reply = c.request("OPTIONS", "/m", headers=PREFLIGHT)
        assert reply.status == 204
        assert reply.headers["access-control-allow-origin"] == "*"
        reply = c.request("GET", "/m", headers={"Origin": ORIGIN})  # same connection
        assert reply.status == 401
        assert reply.headers["access-control-allow-origin"] == "*"


# ---- headers on actual responses


def assert_cors(reply, origin: str = "*") -> None:
    assert reply.headers["access-control-allow-origin"] == origin, reply
    assert "x-request-id" in reply.headers["access-control-expose-headers"]


def test_cors_headers_on_200_404_401_and_405():
    origin = {"Origin": ORIGIN}
    raw = request_bytes("GET", "/m", headers=origin) + request_bytes("GET", "/x", headers=origin)
    raw += request_bytes("POST", "/m", headers=origin)
    replies = exchange(raw)
    assert [r.status for r in replies] == [200, 404, 405]
    for reply in replies:
        assert_cors(reply)
    reply = only(request_bytes("GET", "/m", headers=origin), config=fast_config(api_key="k"))
    assert reply.status == 401
    assert_cors(reply)


def test_no_cors_headers_without_origin_or_for_a_disallowed_origin():
    reply = only(request_bytes("GET", "/m"))
    assert "access-control-allow-origin" not in reply.headers
    config = fast_config(allowed_origins=(ORIGIN,))
    reply = only(
        request_bytes("GET", "/m", headers={"Origin": "https://evil.example"}), config=config
    )
    assert reply.status == 200 and "access-control-allow-origin" not in reply.headers
    reply = only(request_bytes("GET", "/m", headers={"Origin": ORIGIN}), config=config)
    assert_cors(reply, ORIGIN)
    assert reply.headers["vary"] == "Origin"


def test_cors_headers_on_early_rejections():
    config = fast_config(max_body_bytes=10)
    raw = request_bytes("POST", "/echo", b"x" * 11, headers={"Origin": ORIGIN})
    reply = only(raw, config=config)
    assert reply.status == 413
    assert_cors(reply)
    # 408: the body never comes.
    raw = request_bytes("POST", "/echo", headers={"Origin": ORIGIN, "Content-Length": "5"})
    reply = only(raw, config=fast_config(body_timeout_s=0.05), wait_s=0.15)
    assert reply.status == 408
    assert_cors(reply)
    # 431: too many header fields.
    headers = {"Origin": ORIGIN, **{f"x-h{i}": "v" for i in range(5)}}
    reply = only(
        request_bytes("GET", "/m", headers=headers), config=fast_config(max_header_fields=4)
    )
    assert reply.status == 431
    assert_cors(reply)


def test_cors_headers_on_an_sse_stream_and_a_handler_error():
    async def events(request):
        async def gen():
            yield {"a": 1}
            yield "[DONE]"

        return EventSourceResponse(gen())

    async def failing(request):
        raise HTTPError(400, "bad", param="x")

    router = simple_router(events=events, failing=failing)
    origin = {"Origin": ORIGIN}
    raw = request_bytes("GET", "/events", headers=origin)
    raw += request_bytes("GET", "/failing", headers=origin)
    stream, error = exchange(raw, router=router)
    assert stream.headers["content-type"] == "text/event-stream"
    assert_cors(stream)
    assert stream.body == b'data: {"a":1}\n\ndata: [DONE]\n\n'
    assert error.status == 400
    assert_cors(error)
