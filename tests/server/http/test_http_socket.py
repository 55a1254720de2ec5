"""The HTTP core over real sockets on 127.0.0.1:0, one test per behaviour."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from server.http.config import ServerConfig
from server.http.errors import HTTPError
from server.http.messages import JSONResponse, Response, StreamingResponse
from server.http.routing import Router
from server.http.server import run_server
from server.http.sse import EventSourceResponse
from tests.server.helpers import Client, ServerThread, fast_config, request_bytes, wait_until


class Events:
    """Thread-safe record of what handlers saw, read by the test thread."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.flags: dict[str, threading.Event] = {}

    def mark(self, name: str) -> None:
        self.times[name] = time.monotonic()
        self.flag(name).set()

    def flag(self, name: str) -> threading.Event:
        return self.flags.setdefault(name, threading.Event())

    def wait(self, name: str, timeout_s: float = 2.0) -> float:
        assert self.flag(name).wait(timeout_s), f"{name} did not happen"
        return self.times[name]


events = Events()


def build_router() -> Router:
    router = Router()

    async def models(request):
        return JSONResponse({"object": "list", "data": [{"id": "m", "object": "model"}]})

    async def echo(request):
        return Response(
            body=request.body, content_type="application/octet-stream", headers={"x-n": "1"}
        )

    async def info(request):
        return JSONResponse(
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "params": request.path_params,
                "headers": request.headers,
                "client": list(request.client),
                "draining": request.server.is_draining,
            }
        )

    async def slow(request):
        await asyncio.sleep(float(request.query.get("s", "0.2")))
        return JSONResponse({"slow": request.query.get("id")})

    async def teapot(request):
        raise HTTPError(418, "I'm a teapot", param="tea", code="no_coffee")

    async def boom(request):
        raise RuntimeError("secret detail")

    async def wait_for_abort(request):
        # Like an engine request: the disconnect callback aborts what the handler awaits.
        aborted = asyncio.get_running_loop().create_future()

        def on_disconnect():
            events.mark("wait.disconnected")
            aborted.set_result(None)

        request.add_disconnect_callback(on_disconnect)
        events.mark("wait.started")
        await aborted
        return JSONResponse({"discarded": True})

    async def chunks(request):
        async def gen():
            for i in range(3):
                yield f"part{i};"
                await asyncio.sleep(0.01)

        return StreamingResponse(gen(), content_type="text/plain")

    async def hang_stream(request):
        request.add_disconnect_callback(lambda: events.mark("hang.disconnected"))

        async def gen():
            try:
                yield b"first"
                events.mark("hang.started")
                await asyncio.get_running_loop().create_future()
            finally:
                events.mark("hang.closed")

        return StreamingResponse(gen())

    async def sse(request):
        async def gen():
            yield {"n": 1}
            yield "two"
            yield b"three"
            yield "multi\nline"
            await asyncio.sleep(float(request.query.get("pause", "0")))
            yield "[DONE]"

        return EventSourceResponse(gen(), ping_interval_s=float(request.query.get("ping", "15")))

    async def sse_fail(request):
        async def gen():
            yield {"ok": True}
            raise RuntimeError("engine broke")

        return EventSourceResponse(gen())

    async def plain_fail(request):
        async def gen():
            yield b"partial"
            raise RuntimeError("broke")

        return StreamingResponse(gen())

    async def firehose(request):
        events.counts["firehose"] = 0
        chunk = b"x" * 65536

        async def gen():
            try:
                while True:
                    yield chunk
                    events.counts["firehose"] += 1
            finally:
                events.mark("firehose.closed")

        return StreamingResponse(gen())

    for method, path, handler in [
        ("GET", "/v1/models", models),
        ("POST", "/echo", echo),
        ("GET", "/info/{name}", info),
        ("GET", "/v1/models/{model:path}", info),
        ("GET", "/slow", slow),
        ("GET", "/teapot", teapot),
        ("GET", "/boom", boom),
        ("POST", "/wait", wait_for_abort),
        ("GET", "/chunks", chunks),
        ("GET", "/hang", hang_stream),
        ("GET", "/sse", sse),
        ("GET", "/sse-fail", sse_fail),
        ("GET", "/plain-fail", plain_fail),
        ("GET", "/firehose", firehose),
    ]:
        router.add(method, path, handler)
    router.add("GET", "/health", models, public=True)  # served without the API key
    router.add("GET", "/metrics", models, public=True)
    return router


@pytest.fixture(scope="module")
def srv():
    with ServerThread(build_router()) as server:
        yield server


# ---- connections


def test_keep_alive_serves_several_requests(srv):
    with Client(srv.port) as c:
        for _ in range(3):
            reply = c.request("GET", "/v1/models")
            assert reply.status == 200
            assert reply.headers["content-type"] == "application/json"
            assert reply.json()["data"][0]["id"] == "m"
            assert int(reply.headers["content-length"]) == len(reply.body)
        assert srv.call(lambda: len(srv.server.connections)) >= 1


def test_pipelined_requests_are_answered_in_order(srv):
    with Client(srv.port) as c:
        c.send(
            request_bytes("GET", "/slow?s=0.2&id=1")
            + request_bytes("GET", "/slow?s=0&id=2")
            + request_bytes("POST", "/echo", b"three")
        )
        assert c.read_response().json() == {"slow": "1"}
        assert c.read_response().json() == {"slow": "2"}
        assert c.read_response().body == b"three"


def test_http10_client_gets_answer_then_close(srv):
    with Client(srv.port) as c:
        c.send(b"GET /v1/models HTTP/1.0\r\n\r\n")
        reply = c.read_response()
        assert reply.status == 200 and reply.json()["object"] == "list"
        assert c.is_closed_by_server()


def test_http10_stream_is_close_delimited(srv):
    with Client(srv.port) as c:
        c.send(b"GET /chunks HTTP/1.0\r\n\r\n")
        reply = c.read_response()
        assert "transfer-encoding" not in reply.headers
        assert reply.body == b"part0;part1;part2;"


def test_expect_100_continue(srv):
    with Client(srv.port) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = c.read_head()
        assert interim.status == 100
        c.send(b"hello")
        reply = c.read_response()
        assert reply.status == 200 and reply.body == b"hello"


def test_chunked_request_body(srv):
    with Client(srv.port) as c:
        c.send(
            b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
        assert c.read_response().body == b"hello world"


def test_connection_close_request(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/v1/models", headers={"Connection": "close"})
        assert reply.status == 200 and reply.headers["connection"] == "close"
        assert c.is_closed_by_server()


# ---- routing


def test_unknown_path_is_404_in_openai_shape(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/nope")
        assert reply.status == 404
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["type"] == "not_found_error"
        assert c.request("GET", "/v1/models").status == 200  # still keep-alive


def test_wrong_method_is_405_with_allow(srv):
    with Client(srv.port) as c:
        reply = c.request("POST", "/v1/models", b"{}")
        assert reply.status == 405
        assert reply.headers["allow"] == "GET, HEAD"


def test_head_is_served_by_get_without_body(srv):
    with Client(srv.port) as c:
        reply = c.request("HEAD", "/v1/models")
        assert reply.status == 200 and reply.body == b""
        assert int(reply.headers["content-length"]) > 0
        assert c.request("GET", "/v1/models").status == 200  # nothing stray on the wire


def test_path_params_query_and_headers(srv):
    with Client(srv.port) as c:
        info = c.request("GET", "/info/a%20b?x=1&y=&x=2", headers={"X-Twice": "a"}).json()
        assert info["params"] == {"name": "a b"}
        assert info["query"] == {"x": "2", "y": ""}
        assert info["headers"]["x-twice"] == "a"
        assert info["client"][0] == "127.0.0.1"
        assert info["draining"] is False
        info = c.request("GET", "/v1/models/org/model-1").json()
        assert info["params"] == {"model": "org/model-1"}


# ---- errors


def test_handler_http_error_keeps_its_fields(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/teapot")
        assert reply.status == 418
        assert reply.json() == {
            "error": {
                "message": "I'm a teapot",
                "type": "invalid_request_error",
                "param": "tea",
                "code": "no_coffee",
            }
        }


def test_handler_exception_is_generic_500_and_server_keeps_serving(srv, caplog):
    with Client(srv.port) as c, caplog.at_level(logging.ERROR, "nanoserve.http"):
        reply = c.request("GET", "/boom")
        assert reply.status == 500
        assert reply.json()["error"]["type"] == "server_error"
        assert b"secret" not in reply.body
        assert c.request("GET", "/v1/models").status == 200
    assert "secret detail" in caplog.text  # the details are in the log only


# ---- streaming


def test_streaming_response_is_chunked(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/chunks")
        assert reply.headers["transfer-encoding"] == "chunked"
        assert reply.headers["content-type"] == "text/plain"
        assert reply.body == b"part0;part1;part2;"
        assert c.request("GET", "/v1/models").status == 200  # keep-alive after a stream


def test_sse_events_and_headers(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/sse")
        assert reply.headers["content-type"] == "text/event-stream"
        assert reply.headers["cache-control"] == "no-cache"
        assert reply.body == (
            b'data: {"n":1}\n\ndata: two\n\ndata: three\n\n'
            b"data: multi\ndata: line\n\ndata: [DONE]\n\n"
        )


def test_sse_ping_after_silence(srv):
    with Client(srv.port) as c:
        started = time.monotonic()
        reply = c.request("GET", "/sse?pause=0.55&ping=0.2")
        assert time.monotonic() - started >= 0.5
        body = reply.body.decode()
        assert body.count(": ping\n\n") == 2  # at 0.2 s and 0.4 s of silence
        assert body.endswith("data: multi\ndata: line\n\n: ping\n\n: ping\n\ndata: [DONE]\n\n")


def test_sse_error_after_start_sends_error_event_then_closes(srv):
    with Client(srv.port) as c:
        reply = c.request("GET", "/sse-fail")
        assert reply.status == 200
        first, second = reply.body.split(b"\n\n")[:2]
        assert first == b'data: {"ok":true}'
        assert second.startswith(b'data: {"error":') and b"server_error" in second
        assert b"engine broke" not in reply.body
        assert c.is_closed_by_server()


def test_plain_stream_error_after_start_just_closes(srv):
    with Client(srv.port) as c:
        c.send(request_bytes("GET", "/plain-fail"))
        c.read_head()
        assert c.read_chunk() == b"partial"
        with pytest.raises(EOFError):  # no last chunk: the client sees a truncated body
            c.read_chunk()


def test_slow_reader_does_not_grow_server_memory(srv):
    c = Client(srv.port, rcvbuf=4096)
    try:
        c.send(request_bytes("GET", "/firehose"))
        c.read_head()
        time.sleep(0.4)
        produced = events.counts["firehose"]
        time.sleep(0.3)
        assert events.counts["firehose"] == produced, "the stream kept producing"
        assert produced * 65536 < 8 * 1024 * 1024
        buffered = srv.call(
            lambda: max(p.transport.get_write_buffer_size() for p in srv.server.connections)
        )
        assert buffered <= srv.config.write_high_water_bytes + 65536 + 64
        started = time.monotonic()
    finally:
        c.close()
    assert events.wait("firehose.closed") - started < 0.5


# ---- disconnects


def test_disconnect_callback_fires_within_50ms_while_handler_waits(srv):
    events.flag("wait.disconnected").clear()
    c = Client(srv.port)
    c.send(request_bytes("POST", "/wait", b"{}"))
    events.wait("wait.started")
    closed_at = time.monotonic()
    c.close()
    assert events.wait("wait.disconnected") - closed_at < 0.05
    assert wait_until(lambda: not srv.call(lambda: len(srv.server.tasks)))


def test_disconnect_mid_stream_fires_callback_and_closes_iterator_within_50ms(srv):
    c = Client(srv.port)
    c.send(request_bytes("GET", "/hang"))
    c.read_head()
    assert c.read_chunk() == b"first"
    events.wait("hang.started")
    closed_at = time.monotonic()
    c.close()
    assert events.wait("hang.disconnected") - closed_at < 0.05
    assert events.wait("hang.closed") - closed_at < 0.05
    assert wait_until(lambda: not srv.call(lambda: len(srv.server.tasks)))


# ---- limits


def test_content_length_over_limit_is_413_without_reading_body():
    with (
        ServerThread(build_router(), fast_config(max_body_bytes=1000)) as srv,
        Client(srv.port) as c,
    ):
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000000\r\n\r\n" + b"x" * 10)
        reply = c.read_response()
        assert reply.status == 413 and reply.json()["error"]["type"] == "invalid_request_error"
        assert reply.headers["connection"] == "close"
        assert c.is_closed_by_server()


def test_chunked_body_over_limit_is_413():
    with (
        ServerThread(build_router(), fast_config(max_body_bytes=1000)) as srv,
        Client(srv.port) as c,
    ):
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        c.send(b"400\r\n" + b"x" * 1024 + b"\r\n")
        assert c.read_response().status == 413
        assert c.is_closed_by_server()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET /" + b"a" * 9000, 414),  # incomplete request line, already too long
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 17000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 30000, 431),  # incomplete
        (
            b"GET / HTTP/1.1\r\nHost: t\r\n"
            + b"".join(b"X-%d: v\r\n" % i for i in range(101))
            + b"\r\n",
            431,
        ),
        (b"GET / HTTP/1.1\r\nHost: t\r\nBad Header\r\n\r\n", 400),
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
    ],
    ids=[
        "long-line",
        "long-line-partial",
        "big-header",
        "big-header-partial",
        "fields",
        "bad",
        "junk",
    ],
)
def test_head_limits_and_malformed_requests(srv, head, status):
    with Client(srv.port) as c:
        c.send(head)
        reply = c.read_response()
        assert reply.status == status
        assert reply.json()["error"]["message"]
        assert c.is_closed_by_server()


SMUGGLED = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"


@pytest.mark.parametrize(
    "head",
    [
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 60\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Length: 5\r\n\r\n0\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 60\r\n"
        b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",  # obs-fold
    ],
    ids=["cl-then-te", "te-then-cl", "obs-folded-te"],
)
def test_content_length_with_transfer_encoding_is_400_and_closed(srv, head):
    """RFC 9112 6.1: nothing pipelined behind such a request may be served (smuggling)."""
    with Client(srv.port) as c:
        c.send(head + SMUGGLED)
        reply = c.read_response()
        assert reply.status == 400
        assert "Transfer-Encoding" in reply.json()["error"]["message"]
        assert c.is_closed_by_server()


def test_slowloris_header_timeout_is_408(srv):
    with Client(srv.port) as c:
        started = time.monotonic()
        c.send(b"GET /v1/models HTTP/1.1\r\n")
        answered_at = None
        for i in range(20):  # a header line every 0.1 s never completes the head in time
            c.send(b"X-%d: v\r\n" % i)
            c.sock.settimeout(0.1)
            try:
                c.buffer += c.sock.recv(65536)
            except TimeoutError:
                continue
            answered_at = time.monotonic()
            break
        c.sock.settimeout(5.0)
        assert answered_at is not None and 0.45 < answered_at - started < 1.0
        assert c.read_response().status == 408
        assert c.is_closed_by_server()


def test_stalled_body_is_408(srv):
    with Client(srv.port) as c:
        c.send(b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        started = time.monotonic()
        reply = c.read_response()
        assert reply.status == 408
        assert 0.45 < time.monotonic() - started < 1.0
        assert c.is_closed_by_server()


def test_idle_keep_alive_connection_is_closed(srv):
    with Client(srv.port) as c:
        assert c.request("GET", "/v1/models").status == 200
        started = time.monotonic()
        assert c.is_closed_by_server(timeout_s=2.0)
        assert 0.4 < time.monotonic() - started < 1.0


def test_max_connections_gets_503():
    with (
        ServerThread(build_router(), fast_config(max_connections=2)) as srv,
        Client(srv.port) as a,
        Client(srv.port) as b,
    ):
        assert a.request("GET", "/v1/models").status == 200
        assert b.request("GET", "/v1/models").status == 200
        with Client(srv.port) as c:
            c.send(request_bytes("GET", "/v1/models"))
            reply = c.read_response()
            assert reply.status == 503
            assert reply.json()["error"]["type"] == "service_unavailable"
            assert reply.headers["retry-after"] == "1"
            assert len(reply.headers["x-request-id"]) == 32
            assert c.is_closed_by_server()
        assert a.request("GET", "/v1/models").status == 200


# ---- API key


@pytest.fixture(scope="module")
def keyed():
    with ServerThread(build_router(), fast_config(api_key="s3cret-ключ")) as server:
        yield server


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong", "Basic czNjcmV0", "Bearer", "Bearer s3cret-kl\xfcch", "Bearer \xff\xfe"],
)
def test_api_key_rejected_with_401(keyed, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    with Client(keyed.port) as c:
        reply = c.request("GET", "/v1/models", headers=headers)
        assert reply.status == 401
        assert reply.headers["www-authenticate"] == "Bearer"
        assert reply.json()["error"]["type"] == "authentication_error"
        assert c.request("GET", "/health").status == 200  # still open


def test_api_key_accepted_and_exempt_paths(keyed):
    token = "s3cret-ключ".encode().decode("latin-1")  # the key's UTF-8 bytes on the wire
    with Client(keyed.port) as c:
        for scheme in ("Bearer", "bearer"):
            reply = c.request("GET", "/v1/models", headers={"Authorization": f"{scheme} {token}"})
            assert reply.status == 200
        assert c.request("GET", "/health").status == 200
        assert c.request("GET", "/metrics").status == 200


# ---- shutdown and logging


def test_graceful_shutdown_drains_in_flight_and_refuses_new_requests():
    server = ServerThread(build_router(), fast_config(shutdown_timeout_s=5.0))
    with server:
        idle = Client(server.port)
        assert idle.request("GET", "/v1/models").status == 200
        streaming = Client(server.port)
        streaming.send(request_bytes("GET", "/sse?pause=0.4"))
        streaming.read_head()
        future = asyncio.run_coroutine_threadsafe(server.server.shutdown(), server.loop)
        assert wait_until(lambda: server.server.is_draining)
        reply = idle.request("GET", "/info/x")
        assert reply.status == 503 and reply.headers["connection"] == "close"
        body = b""
        while (chunk := streaming.read_chunk()) is not None:
            body += chunk
        assert body.endswith(b"data: [DONE]\n\n")  # the in-flight stream finished
        future.result(5)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=1).close()
        idle.close()
        streaming.close()


def test_shutdown_timeout_cancels_in_flight_stream():
    server = ServerThread(build_router(), fast_config(shutdown_timeout_s=0.2))
    with server:
        c = Client(server.port)
        c.send(request_bytes("GET", "/hang"))
        c.read_head()
        events.wait("hang.started")
        events.flag("hang.closed").clear()
        started = time.monotonic()
        server.run(server.server.shutdown())
        assert 0.15 < time.monotonic() - started < 1.5
        events.wait("hang.closed")
        assert c.is_closed_by_server()
        c.close()


def test_access_log_line_per_request(srv, caplog):
    with caplog.at_level(logging.INFO, "nanoserve.access"), Client(srv.port) as c:
        c.request("GET", "/v1/models")
        c.request("GET", "/nope")
        assert wait_until(lambda: len(caplog.records) >= 2)
    lines = [r.getMessage() for r in caplog.records if r.name == "nanoserve.access"]
    assert any('"GET /v1/models" 200' in line and "127.0.0.1" in line for line in lines)
    assert any('"GET /nope" 404' in line for line in lines)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_drains_in_flight_stream_and_exits_0(signum):
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.server.http.slow_app"],
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[3],
    )
    try:
        port = None
        log_lines = []
        for line in proc.stderr:
            log_lines.append(line)
            if m := re.search(r"listening on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
                break
        assert port is not None, "".join(log_lines)
        idle = Client(port)
        # Connections are served while the startup hook still runs.
        assert idle.request("GET", "/health").json()["ready"] is False
        assert wait_until(lambda: idle.request("GET", "/health").json()["ready"], timeout_s=5)
        streaming = Client(port)
        streaming.send(request_bytes("GET", "/slow?n=10&delay=0.05"))
        streaming.read_head()
        assert streaming.read_chunk() == b'data: {"i":0}\n\n'

        proc.send_signal(signum)

        def refuses_connections() -> bool:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            except OSError:
                return True
            return False

        assert wait_until(refuses_connections, timeout_s=3)
        reply = idle.request("GET", "/health")
        assert reply.status == 503 and reply.headers["connection"] == "close"
        rest = b""
        while (chunk := streaming.read_chunk()) is not None:
            rest += chunk
        assert rest.endswith(b'data: {"i":9}\n\ndata: [DONE]\n\n')
        assert streaming.is_closed_by_server()
        idle.close()
        streaming.close()
        assert proc.wait(timeout=10) == 0
        stderr = "".join(log_lines) + proc.stderr.read()
        assert "shutdown hook ran" in stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def test_failing_startup_hook_exits_1():
    proc = subprocess.run(
        [sys.executable, "-m", "tests.server.http.slow_app", "--fail-startup"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=Path(__file__).resolve().parents[3],
    )
    assert proc.returncode == 1
    assert "startup failed: model folder is missing" in proc.stderr
    assert "shutdown hook ran" in proc.stderr


def test_run_server_returns_1_when_the_port_is_taken(caplog):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with caplog.at_level(logging.ERROR, "nanoserve.http"):
            assert run_server(Router(), ServerConfig(port=port)) == 1
    assert "cannot listen" in caplog.text
