"""x-request-id: echoed when safe, made otherwise, on every response and in the access log."""

from __future__ import annotations

import logging

from server.http.messages import Request
from server.http.request_id import MAX_REQUEST_ID_CHARS, request_id_of
from tests.server.helpers import BytesReader, request_bytes
from tests.server.http.test_cors import exchange, only
from tests.server.http.test_http_protocol import open_connection, run, settle, simple_router


def test_request_id_of():
    assert request_id_of("req-123 abc") == "req-123 abc"
    assert request_id_of("a" * MAX_REQUEST_ID_CHARS) == "a" * MAX_REQUEST_ID_CHARS
    made = {request_id_of(bad) for bad in (None, "", "a" * 129, "caf\xe9", "a\tb", "a\x00b")}
    assert len(made) == 6
    assert all(len(rid) == 32 and int(rid, 16) >= 0 for rid in made)
    assert Request("GET", "/").request_id != Request("GET", "/").request_id


def test_request_id_echoed_generated_and_replaced():
    raw = request_bytes("GET", "/m", headers={"X-Request-Id": "client-1"})
    raw += request_bytes("GET", "/m")
    raw += request_bytes("GET", "/m", headers={"X-Request-Id": "x" * 200})
    raw += request_bytes("GET", "/m", headers={"X-Request-Id": "caf\xe9"})
    raw += request_bytes("GET", "/nope", headers={"X-Request-Id": "client-404"})
    replies = exchange(raw)
    ids = [r.headers["x-request-id"] for r in replies]
    assert ids[0] == "client-1" and ids[4] == "client-404"
    assert replies[4].status == 404
    for made in ids[1:4]:
        assert len(made) == 32 and made != "x" * 200
    assert len(set(ids)) == 5


def test_request_id_on_early_rejections():
    from tests.server.helpers import fast_config

    raw = request_bytes("POST", "/echo", b"x" * 11, headers={"X-Request-Id": "big-1"})
    reply = only(raw, config=fast_config(max_body_bytes=10))
    assert reply.status == 413 and reply.headers["x-request-id"] == "big-1"
    reply = only(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\n")  # no head parsed: a new id
    assert reply.status == 414 and len(reply.headers["x-request-id"]) == 32


def test_handler_sees_the_request_id_and_the_access_log_prints_it(caplog):
    seen = []

    async def record(request):
        seen.append(request.request_id)
        from server.http.messages import JSONResponse

        return JSONResponse({})

    async def main():
        _, proto, t = open_connection(simple_router(record=record))
        proto.data_received(request_bytes("GET", "/record", headers={"X-Request-Id": "abc-9"}))
        proto.data_received(request_bytes("GET", "/nope", headers={"X-Request-Id": "abc-10"}))
        await settle()
        return BytesReader(t.take()).read_all()

    with caplog.at_level(logging.INFO, "nanoserve.access"):
        replies = run(main())
    assert seen == ["abc-9"]
    assert [r.headers["x-request-id"] for r in replies] == ["abc-9", "abc-10"]
    lines = [r.getMessage() for r in caplog.records if r.name == "nanoserve.access"]
    assert any('"GET /record" 200' in line and line.endswith(" abc-9") for line in lines)
    assert any('"GET /nope" 404' in line and line.endswith(" abc-10") for line in lines)
