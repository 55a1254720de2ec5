"""Answering one request: run the handler, write its response (complete or streamed).

Complete bodies go out in one write (wire.response_bytes). A StreamingResponse gets a
head from wire.stream_head, then each item becomes one chunk, framed here and written
straight to the transport, pausing while the transport is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import orjson

from server.http.errors import HTTPError, raw_error_response
from server.http.messages import Request, RequestCycle, Response, StreamingResponse
from server.http.sse import EventSourceResponse, encode_event
from server.http.wire import response_bytes, stream_head

if TYPE_CHECKING:
    from server.http.connection import HTTPProtocol

logger = logging.getLogger("nanoserve.http")

INTERNAL_ERROR = HTTPError(500, "Internal server error")
_LAST_CHUNK = b"0\r\n\r\n"


class Cycle(RequestCycle):
    """One request/response exchange on a connection."""

    __slots__ = (
        "request",
        "handler",
        "error",
        "keep_alive",
        "body_parts",
        "num_body_bytes",
        "started_at",
        "task",
        "status",
        "num_bytes_sent",
        "is_logged",
    )

    def __init__(self) -> None:
        super().__init__()
        self.request: Request | None = None
        self.handler: Any = None
        self.error: HTTPError | None = None
        self.keep_alive = True
        self.body_parts: list[bytes] = []
        self.num_body_bytes = 0
        self.started_at = time.perf_counter()
        self.task: asyncio.Task | None = None
        self.status = 0
        self.num_bytes_sent = 0
        self.is_logged = False


async def aclose_iterator(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a response stream failed")


async def run_cycle(proto: HTTPProtocol, cycle: Cycle) -> None:
    """The task of one request: handler, response, then the next pipelined request."""
    request = cycle.request
    try:
        try:
            response = await cycle.handler(request)
        except HTTPError as exc:
            response = exc
        except Exception:
            logger.exception("handler failed: %s %s", request.method, request.path)
            response = INTERNAL_ERROR
        if cycle.is_disconnected or proto.is_closed:
            if isinstance(response, StreamingResponse):
                await aclose_iterator(response.body_iterator)
            return
        if isinstance(response, Response):
            send_response(
                proto,
                cycle,
                response.status,
                response.content_type,
                response.body,
                response.headers,
            )
        elif isinstance(response, HTTPError):
            send_error(proto, cycle, response)
        elif isinstance(response, StreamingResponse):
            if not await stream_response(proto, cycle, response):
                return
        else:
            logger.error("handler returned %r, not a Response", type(response).__name__)
            send_error(proto, cycle, INTERNAL_ERROR)
        proto.end_cycle(cycle.keep_alive)
        proto.process_events()
    except asyncio.CancelledError:
        # The client left mid-stream (already handled), or the server's shutdown timeout.
        if not cycle.is_disconnected:
            logger.warning("request cancelled: %s %s", request.method, request.path)
            proto.close_now()
    except Exception:
        logger.exception("internal error answering %s %s", request.method, request.path)
        proto.close_now()
    finally:
        proto.log_access(cycle)
        proto.server.tasks.discard(cycle.task)


def send_error(proto: HTTPProtocol, cycle: Cycle, exc: HTTPError) -> None:
    try:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers]
    except UnicodeEncodeError:
        logger.exception("invalid header in %r", exc)
        exc, headers = INTERNAL_ERROR, []
    send_response(proto, cycle, exc.status, b"application/json", exc.body(), headers)


def send_response(
    proto: HTTPProtocol,
    cycle: Cycle,
    status: int,
    content_type: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
) -> None:
    if proto.server.is_draining:
        cycle.keep_alive = False
    try:
        data = response_bytes(
            status, content_type, body, headers, cycle.keep_alive, cycle.request.method == "HEAD"
        )
    except ValueError:
        logger.exception("invalid response from handler for %s", cycle.request.path)
        status = 500
        body = INTERNAL_ERROR.body()
        cycle.keep_alive = False
        data = raw_error_response(500, INTERNAL_ERROR.message)
    proto.transport.write(data)
    cycle.status = status
    cycle.num_bytes_sent = len(body)


class Pinger:
    """Writes `frame` whenever the stream has been silent for interval_s seconds."""

    def __init__(self, proto: HTTPProtocol, frame: bytes, interval_s: float) -> None:
        self.proto = proto
        self.frame = frame
        self.interval_s = interval_s
        self.loop = proto.loop
        self.last_write_at = self.loop.time()
        self.handle = self.loop.call_later(interval_s, self._tick)

    def _tick(self) -> None:
        proto = self.proto
        if proto.is_closed:
            return
        now = self.loop.time()
        due_at = self.last_write_at + self.interval_s
        if now >= due_at - 1e-3:
            # A paused transport already holds unsent bytes: a ping would add nothing.
            if not proto.is_write_paused:
                proto.transport.write(self.frame)
            self.last_write_at = now
            due_at = now + self.interval_s
        self.handle = self.loop.call_at(due_at, self._tick)

    def cancel(self) -> None:
        self.handle.cancel()


async def stream_response(proto: HTTPProtocol, cycle: Cycle, response: StreamingResponse) -> bool:
    """Send `response`; True when it completed (then cycle.keep_alive says whether the
    connection may serve another request), False when the connection is closing."""
    transport = proto.transport
    iterator = response.body_iterator
    # Chunked framing for HTTP/1.1 peers; HTTP/1.0 peers get a close-delimited body.
    is_chunked = proto.conn.their_http_version >= b"1.1"
    if proto.server.is_draining or not is_chunked:
        cycle.keep_alive = False
    try:
        head = stream_head(
            response.status, response.content_type, response.headers, cycle.keep_alive, is_chunked
        )
    except ValueError:
        logger.exception("invalid streaming response from handler for %s", cycle.request.path)
        await aclose_iterator(iterator)
        cycle.status = 500
        transport.write(raw_error_response(500, "Internal server error"))
        proto.end_failed_stream(cycle)
        return False
    cycle.status = response.status
    cycle.response_started = True
    transport.write(head)
    if cycle.request.method == "HEAD":
        await aclose_iterator(iterator)
        return True

    interval_s = response.ping_interval_s
    if interval_s is None:
        interval_s = proto.config.sse_ping_interval_s
    pinger = None
    if response.ping_frame is not None and interval_s > 0:
        frame = response.ping_frame
        pinger = Pinger(
            proto, b"%x\r\n%b\r\n" % (len(frame), frame) if is_chunked else frame, interval_s
        )
    is_plain_sse = type(response).encode is EventSourceResponse.encode
    write_chunks = _write_sse if is_chunked and is_plain_sse else _write
    failure: Exception | None = None
    try:
        cycle.num_bytes_sent = await write_chunks(proto, cycle, response, is_chunked, pinger)
    except Exception as exc:
        failure = exc
    finally:
        if pinger is not None:
            pinger.cancel()
        await aclose_iterator(iterator)

    if cycle.is_disconnected or proto.is_closed:
        return False
    if failure is not None:
        logger.error(
            "stream failed after the response started: %s %s",
            cycle.request.method,
            cycle.request.path,
            exc_info=failure,
        )
        frame = response.error_frame(failure)
        if frame:
            transport.write(
                b"%x\r\n%b\r\n%b" % (len(frame), frame, _LAST_CHUNK) if is_chunked else frame
            )
        proto.end_failed_stream(cycle)
        return False
    if is_chunked:
        transport.write(_LAST_CHUNK)
    return True


async def _write(
    proto: HTTPProtocol,
    cycle: Cycle,
    response: StreamingResponse,
    is_chunked: bool,
    pinger: Pinger | None,
) -> int:
    transport = proto.transport
    loop = proto.loop
    encode = response.encode
    num_bytes = 0
    async for item in response.body_iterator:
        data = encode(item)
        if not data:
            continue
        chunk = b"%x\r\n%b\r\n" % (len(data), data) if is_chunked else data
        transport.write(chunk)
        num_bytes += len(chunk)
        cycle.num_bytes_sent = num_bytes
        if pinger is not None:
            pinger.last_write_at = loop.time()
        if proto.is_write_paused:
            await proto.drain()
        if cycle.is_disconnected:
            break
    return num_bytes


async def _write_sse(
    proto: HTTPProtocol,
    cycle: Cycle,
    response: StreamingResponse,
    is_chunked: bool,
    pinger: Pinger | None,
) -> int:
    """_write for EventSourceResponse, with one-line events framed in one step (hot path)."""
    transport = proto.transport
    loop = proto.loop
    dumps = orjson.dumps
    num_bytes = 0
    async for item in response.body_iterator:
        # One-line events are framed (SSE + chunk) in one step; str formatting is the
        # cheapest way in CPython, so ASCII text stays text until the final encode.
        kind = type(item)
        if kind is str and item.isascii() and "\n" not in item and "\r" not in item:
            chunk = f"{len(item) + 8:x}\r\ndata: {item}\n\n\r\n".encode()
        elif kind is dict:
            data = dumps(item)  # orjson never emits a raw newline
            chunk = b"%x\r\ndata: %b\n\n\r\n" % (len(data) + 8, data)
        elif kind is bytes and b"\n" not in item and b"\r" not in item:
            chunk = b"%x\r\ndata: %b\n\n\r\n" % (len(item) + 8, item)
        else:
            frame = encode_event(item)
            chunk = b"%x\r\n%b\r\n" % (len(frame), frame)
        transport.write(chunk)
        num_bytes += len(chunk)
        cycle.num_bytes_sent = num_bytes
        if pinger is not None:
            pinger.last_write_at = loop.time()
        if proto.is_write_paused:
            await proto.drain()
        if cycle.is_disconnected:
            break
    return num_bytes
