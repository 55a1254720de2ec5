"""Malformed and random bytes never break the server: fake transport and real sockets."""

from __future__ import annotations

import asyncio
import re
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.http.messages import JSONResponse, Response
from server.http.routing import Router
from tests.server.helpers import Client, ServerThread, fast_config
from tests.server.http.test_http_protocol import open_connection, settle

EXPECTED_STATUSES = {100, 200, 400, 404, 405, 413, 414, 431, 501, 505}


def fuzz_router() -> Router:
    router = Router()

    async def ok(request):
        return JSONResponse({"path": request.path, "n": len(request.body)})

    async def echo(request):
        return Response(body=b"%d" % len(request.body), content_type="text/plain")

    router.add("GET", "/", ok)
    router.add("GET", "/v1/models/{model:path}", ok)
    router.add("POST", "/echo", echo)
    return router


line_ends = st.sampled_from([b"\r\n", b"\n", b"\r", b"", b"\r\r\n"])
tokens = st.sampled_from(
    [b"GET", b"POST", b"HEAD", b"PUT", b"G\x00T", b"", b" ", b"get", b"CONNECT", b"\xff"]
)
targets = st.one_of(
    st.sampled_from([b"/", b"/echo", b"/v1/models/a/b", b"*", b"http://x/", b"/%zz", b"/?a=%"]),
    st.binary(max_size=40),
)
versions = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1x", b"HTTP/", b""])
headers = st.lists(
    st.tuples(
        st.sampled_from(
            [b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect", b"Connection", b"X"]
        )
        | st.binary(max_size=12),
        st.sampled_from([b"t", b"5", b"-1", b"chunked", b"100-continue", b"close", b"99999999999"])
        | st.binary(max_size=20),
    ),
    max_size=6,
)
structured = st.builds(
    lambda method, target, version, hdrs, end, body: (
        method
        + b" "
        + target
        + b" "
        + version
        + end
        + b"".join(name + b": " + value + end for name, value in hdrs)
        + end
        + body
    ),
    tokens,
    targets,
    versions,
    headers,
    line_ends,
    st.binary(max_size=64),
)
payloads = st.lists(st.one_of(structured, st.binary(max_size=300)), min_size=1, max_size=3).map(
    b"".join
)


@settings(max_examples=200, deadline=None)
@given(payload=payloads, cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_protocol_survives_any_bytes(payload, cuts):
    async def main():
        server, proto, transport = open_connection(fuzz_router())
        errors = []
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: errors.append(ctx))
        bounds = sorted({0, len(payload), *(c for c in cuts if c < len(payload))})
        for start, end in zip(bounds, bounds[1:], strict=False):
            if transport.is_closed:
                break
            proto.data_received(payload[start:end])
            await settle(3)
        # Bodies never hold a status line (no request bytes are echoed), so this finds them
        # all, whatever the framing (HEAD, HTTP/1.0) of each response.
        output = transport.take()
        assert not output or output.startswith(b"HTTP/1.1 ")
        statuses = {int(s) for s in re.findall(rb"(?:^|\r\n)HTTP/1\.1 (\d{3}) ", output)}
        assert statuses <= EXPECTED_STATUSES
        if not transport.is_closed:
            proto.connection_lost(None)
        await settle(3)
        for task in list(server.tasks):
            task.cancel()
        await settle(3)
        assert not errors

    asyncio.run(main())


@pytest.fixture(scope="module")
def fuzz_server():
    with ServerThread(fuzz_router(), fast_config(max_body_bytes=4096)) as server:
        yield server


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(payload=payloads, half_close=st.booleans())
def test_server_answers_a_valid_request_after_garbage(fuzz_server, payload, half_close):
    with socket.create_connection(("127.0.0.1", fuzz_server.port), timeout=3) as sock:
        try:
            sock.sendall(payload)
            if half_close:
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):  # the server closes once it sees EOF
                    pass
        except (ConnectionResetError, BrokenPipeError):
            pass
    with Client(fuzz_server.port) as c:
        reply = c.request("GET", "/v1/models/org/x")
        assert reply.status == 200 and reply.json()["path"] == "/v1/models/org/x"
