"""HTTPProtocol fed bytes through a fake transport, plus the sans-I/O pieces it uses."""

from __future__ import annotations

import asyncio
import logging

import pytest

from server.http import connection
from server.http.config import ServerConfig
from server.http.connection import HTTPProtocol
from server.http.errors import HTTPError, error_body
from server.http.messages import JSONResponse, Request, Response, StreamingResponse
from server.http.routing import Router
from server.http.server import HTTPServer
from server.http.sse import EventSourceResponse, encode_event, encode_named_event
from server.http.wire import response_bytes, stream_head, wants_keep_alive
from tests.server.helpers import BytesReader, fast_config, request_bytes


class FakeTransport:
    """Records writes; reports a write buffer that only drains when the test says so."""

    def __init__(self, proto: HTTPProtocol, high_water: int = 1 << 30) -> None:
        self.proto = proto
        self.data = bytearray()
        self.buffered = 0
        self.high_water = high_water
        self.is_paused = False
        self.is_reading = True
        self.is_eof = False
        self.is_closed = False

    def write(self, data: bytes) -> None:
        assert not self.is_closed and not self.is_eof, "write after close"
        self.data += data
        self.buffered += len(data)
        if self.buffered > self.high_water and not self.is_paused:
            self.is_paused = True
            self.proto.pause_writing()

    def drain(self) -> None:
        self.buffered = 0
        if self.is_paused:
            self.is_paused = False
            self.proto.resume_writing()

    def take(self) -> bytes:
        data, self.data = bytes(self.data), bytearray()
        return data

    def get_extra_info(self, name: str, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def pause_reading(self) -> None:
        self.is_reading = False

    def resume_reading(self) -> None:
        self.is_reading = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.is_eof = True

    def close(self) -> None:
        if not self.is_closed:
            self.is_closed = True
            asyncio.get_running_loop().call_soon(self.proto.connection_lost, None)

    abort = close

    def is_closing(self) -> bool:
        return self.is_closed


def run(coro):
    return asyncio.run(coro)


async def settle(rounds: int = 5) -> None:
    for _ in range(rounds):
        await asyncio.sleep(0)


def open_connection(router: Router, config: ServerConfig | None = None, **transport_kwargs):
    server = HTTPServer(router, config or fast_config())
    proto = HTTPProtocol(server.state)
    transport = FakeTransport(proto, **transport_kwargs)
    proto.connection_made(transport)
    return server, proto, transport


def simple_router(**handlers) -> Router:
    router = Router()

    async def models(request):
        return JSONResponse({"ok": True})

    async def echo(request):
        return Response(body=request.body, content_type="text/plain")

    router.add("GET", "/m", models)
    router.add("POST", "/echo", echo)
    for path, handler in handlers.items():
        router.add("GET", "/" + path, handler)
    return router


def test_exact_response_bytes():
    async def main():
        _, proto, t = open_connection(simple_router())
        proto.data_received(request_bytes("GET", "/m", headers={"X-Request-Id": "r1"}))
        await settle()
        assert t.take() == (
            b"HTTP/1.1 200 OK\r\nx-request-id: r1\r\ncontent-type: application/json\r\n"
            b'content-length: 11\r\n\r\n{"ok":true}'
        )
        assert not t.is_closed

    run(main())


def test_request_fed_one_byte_at_a_time():
    async def main():
        _, proto, t = open_connection(simple_router())
        for byte in request_bytes("POST", "/echo", b"hello"):
            proto.data_received(bytes([byte]))
        await settle()
        assert BytesReader(t.take()).read_response().body == b"hello"

    run(main())


def test_pipelined_requests_in_one_packet_are_answered_in_order():
    async def slow(request):
        await asyncio.sleep(0.01)
        return JSONResponse("slow")

    async def main():
        _, proto, t = open_connection(simple_router(slow=slow))
        proto.data_received(
            request_bytes("GET", "/slow") + request_bytes("GET", "/m") + request_bytes("GET", "/x")
        )
        await asyncio.sleep(0.05)
        replies = BytesReader(t.take()).read_all()
        assert [r.status for r in replies] == [200, 200, 404]
        assert replies[0].json() == "slow"

    run(main())


def test_socket_is_read_while_handler_runs_and_paused_only_past_a_bound():
    async def main():
        release = asyncio.Event()

        async def wait(request):
            await release.wait()
            return JSONResponse("done")

        _, proto, t = open_connection(simple_router(wait=wait))
        proto.data_received(request_bytes("GET", "/wait"))
        await settle()
        proto.data_received(request_bytes("GET", "/m"))
        assert t.is_reading  # a pipelined request does not stop reading (disconnects are seen)
        proto.data_received(b"x" * (connection.MAX_PIPELINED_BYTES + 1))
        assert not t.is_reading
        release.set()
        await settle()
        assert t.is_reading
        replies = BytesReader(t.take()).read_all()
        assert [r.json() for r in replies[:2]] == ["done", {"ok": True}]
        assert replies[2].status == 414  # the junk: one over-long "request line"

    run(main())


def test_disconnect_callbacks_run_synchronously_in_connection_lost():
    async def main():
        called = []

        async def wait(request):
            request.add_disconnect_callback(lambda: called.append("first"))
            request.add_disconnect_callback(lambda: 1 / 0)  # logged, the next still runs
            request.add_disconnect_callback(lambda: called.append("third"))
            await asyncio.sleep(10)

        server, proto, t = open_connection(simple_router(wait=wait))
        proto.data_received(request_bytes("GET", "/wait"))
        await settle()
        cycle = proto.cycle
        proto.connection_lost(None)
        assert called == ["first", "third"]
        assert cycle.request.is_disconnected
        late = []
        cycle.request.add_disconnect_callback(lambda: late.append(1))
        assert late == [1]  # already disconnected: called at once
        for task in server.tasks:
            task.cancel()
        await settle()

    run(main())


def test_disconnect_mid_stream_cancels_and_closes_the_iterator():
    async def main():
        closed = []

        async def stream(request):
            async def gen():
                try:
                    yield b"a"
                    await asyncio.sleep(10)
                    yield b"b"
                finally:
                    closed.append(True)

            return StreamingResponse(gen())

        server, proto, t = open_connection(simple_router(stream=stream))
        proto.data_received(request_bytes("GET", "/stream"))
        await settle()
        assert t.take().endswith(b"1\r\na\r\n")
        proto.connection_lost(None)
        await settle()
        assert closed == [True]
        assert not server.tasks

    run(main())


def test_backpressure_pauses_the_stream_until_the_transport_drains():
    async def main():
        produced = []

        async def stream(request):
            async def gen():
                for i in range(100):
                    produced.append(i)
                    yield b"x" * 1000

            return StreamingResponse(gen())

        _, proto, t = open_connection(simple_router(stream=stream), high_water=4000)
        proto.data_received(request_bytes("GET", "/stream"))
        await settle(20)
        stalled_at = len(produced)
        assert stalled_at < 10  # stopped once the transport went over its mark
        await settle(20)
        assert len(produced) == stalled_at
        while len(produced) < 100:
            t.drain()
            await settle()
        t.drain()
        await settle()
        reply = BytesReader(t.take()).read_response()
        assert len(reply.body) == 100_000

    run(main())


def test_100_continue_is_sent_only_when_the_body_is_awaited():
    async def main():
        _, proto, t = open_connection(simple_router())
        head = (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        proto.data_received(head)
        assert t.take() == b"HTTP/1.1 100 Continue\r\n\r\n"
        proto.data_received(b"hi")
        await settle()
        assert BytesReader(t.take()).read_response().body == b"hi"
        proto.data_received(head + b"ok")  # body sent along: no interim response
        await settle()
        assert t.take().startswith(b"HTTP/1.1 200 OK")

    run(main())


def test_error_before_body_is_read_with_expect_continue_closes():
    async def main():
        _, proto, t = open_connection(simple_router())
        proto.data_received(
            b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
        )
        reply = BytesReader(t.take()).read_response()
        assert reply.status == 404 and reply.headers["connection"] == "close"
        assert t.is_eof

    run(main())


def test_error_found_at_head_drops_the_body_and_keeps_the_connection():
    async def main():
        _, proto, t = open_connection(simple_router())
        proto.data_received(request_bytes("POST", "/nope", b"x" * 100) + request_bytes("GET", "/m"))
        await settle()
        replies = BytesReader(t.take()).read_all()
        assert [r.status for r in replies] == [404, 200]
        assert not t.is_eof

    run(main())


def test_malformed_request_is_400_then_half_close_then_close(monkeypatch):
    monkeypatch.setattr(connection, "LINGER_S", 0.01)

    async def main():
        _, proto, t = open_connection(simple_router())
        proto.data_received(b"GET / HTTP/1.1\r\nHost: t\r\nbad header\r\n\r\n")
        reply = BytesReader(t.take()).read_response()
        assert reply.status == 400 and reply.headers["connection"] == "close"
        assert t.is_eof and not t.is_closed
        proto.data_received(b"more junk is ignored")
        await asyncio.sleep(0.03)
        assert t.is_closed

    run(main())


def test_head_and_204_responses():
    async def empty(request):
        return Response(204)

    async def main():
        _, proto, t = open_connection(simple_router(empty=empty))
        rid = {"X-Request-Id": "r"}
        proto.data_received(
            request_bytes("HEAD", "/m", headers=rid) + request_bytes("GET", "/empty", headers=rid)
        )
        await settle()
        data = t.take()
        assert data == (
            b"HTTP/1.1 200 OK\r\nx-request-id: r\r\ncontent-type: application/json\r\n"
            b"content-length: 11\r\n\r\n"
            b"HTTP/1.1 204 No Content\r\nx-request-id: r\r\ncontent-type: application/json\r\n\r\n"
        )

    run(main())


def test_invalid_handler_header_is_500_and_close():
    async def bad(request):
        return Response(200, b"x", headers={"x-evil": "a\r\nset-cookie: b"})

    async def main():
        _, proto, t = open_connection(simple_router(bad=bad))
        proto.data_received(request_bytes("GET", "/bad"))
        await settle()
        reply = BytesReader(t.take()).read_response()
        assert reply.status == 500 and "set-cookie" not in reply.headers
        assert t.is_closed

    run(main())


def test_handler_returning_a_non_response_is_500():
    async def wrong(request):
        return {"not": "a response"}

    async def main():
        _, proto, t = open_connection(simple_router(wrong=wrong))
        proto.data_received(request_bytes("GET", "/wrong"))
        await settle()
        assert BytesReader(t.take()).read_response().status == 500

    run(main())


def test_response_after_disconnect_is_dropped():
    async def main():
        release = asyncio.Event()

        async def wait(request):
            await release.wait()
            return JSONResponse("late")

        server, proto, t = open_connection(simple_router(wait=wait))
        proto.data_received(request_bytes("GET", "/wait"))
        await settle()
        t.close()  # the client went away
        await settle()
        release.set()
        await settle()
        assert t.take() == b"" and not server.tasks

    run(main())


def test_draining_server_answers_503_and_closes():
    async def main():
        server, proto, t = open_connection(simple_router())
        server.state.is_draining = True
        proto.data_received(request_bytes("GET", "/m"))
        reply = BytesReader(t.take()).read_response()
        assert reply.status == 503 and reply.json()["error"]["type"] == "service_unavailable"
        assert reply.headers["retry-after"] == "1"
        assert t.is_eof

    run(main())


def test_in_flight_response_during_drain_says_close():
    async def main():
        release = asyncio.Event()

        async def wait(request):
            assert request.server.is_draining is False
            await release.wait()
            return JSONResponse("ok")

        server, proto, t = open_connection(simple_router(wait=wait))
        proto.data_received(request_bytes("GET", "/wait"))
        await settle()
        server.state.is_draining = True
        release.set()
        await settle()
        assert BytesReader(t.take()).read_response().headers["connection"] == "close"
        assert t.is_closed

    run(main())


def test_sse_ping_frames_are_chunks():
    async def main():
        async def sse(request):
            async def gen():
                await asyncio.sleep(0.05)
                yield "x"

            return EventSourceResponse(gen(), ping_interval_s=0.02)

        _, proto, t = open_connection(simple_router(sse=sse))
        proto.data_received(request_bytes("GET", "/sse"))
        await asyncio.sleep(0.1)
        body = BytesReader(t.take()).read_response().body
        assert body == b": ping\n\n: ping\n\ndata: x\n\n"

    run(main())


# ---- sans-I/O pieces


def test_check_auth_constant_time_bytes():
    server = HTTPServer(Router(), ServerConfig(api_key="k\u00e9y"))
    server.check_auth("Bearer " + "k\u00e9y".encode().decode("latin-1"))
    server.check_auth("BEARER   " + "k\u00e9y".encode().decode("latin-1"))
    for value in (None, "", "Bearer", "Bearer k\u00e9y", "Bearer key", "Token k", "Bearer \xff"):
        with pytest.raises(HTTPError) as info:
            server.check_auth(value)
        assert info.value.status == 401
        assert ("www-authenticate", "Bearer") in info.value.headers


def test_check_auth_takes_the_key_as_x_api_key():
    server = HTTPServer(Router(), ServerConfig(api_key="key"))
    server.check_auth(None, "key")
    server.check_auth("Bearer wrong", "key")
    server.check_auth("Bearer key", "wrong")
    for authorization, x_api_key in (
        (None, "wrong"),
        (None, ""),
        ("Bearer k", "ke"),
        ("key", None),
    ):
        with pytest.raises(HTTPError) as info:
            server.check_auth(authorization, x_api_key)
        assert info.value.status == 401 and "x-api-key" in info.value.message


def test_response_bytes_validation_and_framing():
    assert response_bytes(200, b"text/plain", b"hi", [], True, False) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 2\r\n\r\nhi"
    )
    data = response_bytes(
        404,
        b"application/json",
        b"{}",
        [(b"content-type", b"x/y"), (b"content-length", b"99"), (b"x-a", b"1")],
        False,
        True,
    )
    assert data == (
        b"HTTP/1.1 404 Not Found\r\ncontent-type: x/y\r\nx-a: 1\r\n"
        b"content-length: 2\r\nconnection: close\r\n\r\n"
    )
    for headers in ([(b"bad name", b"v")], [(b"x", b"a\nb")], [(b"x", b"\x00")]):
        with pytest.raises(ValueError):
            response_bytes(200, b"t", b"", headers, True, False)
    with pytest.raises(ValueError):
        response_bytes(99, b"t", b"", [], True, False)


def test_stream_head_framing():
    assert stream_head(200, b"text/event-stream", [], True, True) == (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    assert stream_head(200, b"t", [(b"transfer-encoding", b"gzip")], True, False).endswith(
        b"content-type: t\r\nconnection: close\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("version", "header", "expected"),
    [
        (b"1.1", None, True),
        (b"1.1", "close", False),
        (b"1.1", "Keep-Alive, Close", False),
        (b"1.1", "closed", True),
        (b"1.0", None, False),
        (b"1.0", "keep-alive", False),
    ],
)
def test_keep_alive_rule(version, header, expected):
    assert wants_keep_alive(version, header) is expected


@pytest.mark.parametrize(
    ("status", "error_type"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (405, "invalid_request_error"),
        (408, "invalid_request_error"),
        (413, "invalid_request_error"),
        (414, "invalid_request_error"),
        (431, "invalid_request_error"),
        (429, "rate_limit_error"),
        (500, "server_error"),
        (503, "service_unavailable"),
    ],
)
def test_error_body_default_types(status, error_type):
    import orjson

    error = orjson.loads(error_body(status, "m"))["error"]
    assert error["type"] == error_type
    assert set(error) == {"message", "type", "param", "code"}


def test_http_error_validation():
    with pytest.raises(ValueError):
        HTTPError(200, "not an error")
    exc = HTTPError(400, "bad", param="temperature", headers=[("x", "1")])
    assert b'"param":"temperature"' in exc.body()


@pytest.mark.parametrize(
    ("item", "frame"),
    [
        ("hi", b"data: hi\n\n"),
        (b"hi", b"data: hi\n\n"),
        ({"a": [1, 2]}, b'data: {"a":[1,2]}\n\n'),
        ([1], b"data: [1]\n\n"),
        ("a\nb\r\nc", b"data: a\ndata: b\ndata: c\n\n"),
        ("", b"data: \n\n"),
    ],
)
def test_encode_event(item, frame):
    assert encode_event(item) == frame


def test_encode_event_refuses_other_types():
    with pytest.raises(TypeError):
        encode_event(3)


def test_encode_named_event():
    assert encode_named_event("ping", {"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    with pytest.raises(ValueError):
        encode_named_event("a\nb", "x")


def test_request_json_and_callbacks(caplog):
    request = Request("POST", "/x", body=b"{bad")
    with pytest.raises(HTTPError) as info:
        request.json()
    assert info.value.status == 400
    assert Request("POST", "/x", body=b'{"a": 1}').json() == {"a": 1}
    calls = []
    request.add_disconnect_callback(lambda: calls.append(1))
    with caplog.at_level(logging.ERROR, "nanoserve.http"):
        request.add_disconnect_callback(lambda: 1 / 0)
        request.cycle.mark_disconnected()
        request.cycle.mark_disconnected()  # idempotent
    assert calls == [1] and request.is_disconnected
    assert "disconnect callback" in caplog.text


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": 70000},
        {"api_key": ""},
        {"max_body_bytes": 0},
        {"header_timeout_s": 0},
        {"shutdown_timeout_s": -1},
        {"max_request_line_bytes": 4},
        {"write_high_water_bytes": 10},
    ],
)
def test_server_config_validation(kwargs):
    with pytest.raises(ValueError):
        ServerConfig(**kwargs)
