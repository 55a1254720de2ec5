"""One request/response exchange: run the handler, write its response, say how it ended.

The connection hands run_cycle what it needs (transport, flow control, the drain flag,
framing, ping interval) and acts on the Outcome it returns; nothing here knows the
connection. The Cycle is the exchange's state, written here and read by the connection
for the access log; the connection marks it disconnected when the client goes away.
Complete bodies go out in one write (wire.response_bytes). A StreamingResponse gets a
head from wire.stream_head, then each item becomes one chunk, framed here and written
straight to the transport, pausing while the transport is above its high-water mark.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Callable
from typing import Any

import orjson

from server.http.errors import HTTPError, raw_error_response
from server.http.flow_control import FlowControl
from server.http.messages import Request, RequestCycle, Response, StreamingResponse
from server.http.sse import EventSourceResponse, encode_event
from server.http.wire import response_bytes, stream_head

logger = logging.getLogger("nanoserve.http")

INTERNAL_ERROR = HTTPError(500, "Internal server error")
_LAST_CHUNK = b"0\r\n\r\n"


class Outcome(enum.Enum):
    """How an exchange ended, i.e. what the connection does next."""

    KEEP_ALIVE = "keep-alive"  # response complete: read the next (pipelined) request
    CLOSE = "close"  # response complete, says "connection: close": close the connection
    BROKEN = "broken"  # the stream failed after (or while making) its head: close
    ABORT = "abort"  # cancelled or an internal error: close now, unsent bytes dropped
    GONE = "gone"  # the client went away: nothing to send, the connection is closing


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
        "server_head",
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
        # Head lines the server adds to every response: x-request-id, CORS (connection.py).
        self.server_head = b""


async def aclose_iterator(iterator: Any) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        logger.exception("closing a response stream failed")


async def run_cycle(
    cycle: Cycle,
    transport: Any,
    flow: FlowControl,
    is_draining: Callable[[], bool],
    is_chunked: bool,
    ping_interval_s: float,
) -> Outcome:
    """Call the handler and send its response. `is_chunked`: the peer speaks HTTP/1.1;
    `ping_interval_s`: for streams that do not set their own."""
    request = cycle.request
    try:
        try:
            response = await cycle.handler(request)
        except HTTPError as exc:
            response = exc
        except Exception:
            logger.exception("handler failed: %s %s", request.method, request.path)
            response = INTERNAL_ERROR
        if cycle.is_disconnected:
            if isinstance(response, StreamingResponse):
                await aclose_iterator(response.body_iterator)
            return Outcome.GONE
        if isinstance(response, Response):
            return send_response(
                cycle,
                transport,
                response.status,
                response.content_type,
                response.body,
                response.headers,
                is_draining(),
            )
        if isinstance(response, HTTPError):
            return send_error(cycle, transport, response, is_draining())
        if isinstance(response, StreamingResponse):
            return await stream_response(
                cycle, transport, flow, response, is_draining(), is_chunked, ping_interval_s
            )
        logger.error("handler returned %r, not a Response", type(response).__name__)
        return send_error(cycle, transport, INTERNAL_ERROR, is_draining())
    except asyncio.CancelledError:
        # The client left mid-stream (already handled), or the server's shutdown timeout.
        if cycle.is_disconnected:
            return Outcome.GONE
        logger.warning("request cancelled: %s %s", request.method, request.path)
        return Outcome.ABORT
    except Exception:
        logger.exception("internal error answering %s %s", request.method, request.path)
        return Outcome.ABORT


def send_error(cycle: Cycle, transport: Any, exc: HTTPError, is_draining: bool) -> Outcome:
    try:
        headers = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in exc.headers]
    except UnicodeEncodeError:
        logger.exception("invalid header in %r", exc)
        exc, headers = INTERNAL_ERROR, []
    return send_response(
        cycle, transport, exc.status, b"application/json", exc.body(), headers, is_draining
    )


def send_response(
    cycle: Cycle,
    transport: Any,
    status: int,
    content_type: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    is_draining: bool,
) -> Outcome:
    if is_draining:
        cycle.keep_alive = False
    try:
        data = response_bytes(
            status,
            content_type,
            body,
            headers,
            cycle.keep_alive,
            cycle.request.method == "HEAD",
            cycle.server_head,
        )
    except ValueError:
        logger.exception("invalid response from handler for %s", cycle.request.path)
        status = 500
        body = INTERNAL_ERROR.body()
        cycle.keep_alive = False
        data = raw_error_response(500, INTERNAL_ERROR.message, (), cycle.server_head)
    transport.write(data)
    cycle.status = status
    cycle.num_bytes_sent = len(body)
    return Outcome.KEEP_ALIVE if cycle.keep_alive else Outcome.CLOSE


class Pinger:
    """Writes `frame` whenever the stream has been silent for interval_s seconds."""

    def __init__(
        self, cycle: Cycle, transport: Any, flow: FlowControl, frame: bytes, interval_s: float
    ) -> None:
        self.cycle = cycle
        self.transport = transport
        self.flow = flow
        self.frame = frame
        self.interval_s = interval_s
        self.loop = loop = asyncio.get_running_loop()
        self.last_write_at = loop.time()
        self.handle = loop.call_later(interval_s, self._tick)

    def _tick(self) -> None:
        if self.cycle.is_disconnected:
            return
        now = self.loop.time()
        due_at = self.last_write_at + self.interval_s
        if now >= due_at - 1e-3:
            # A paused transport already holds unsent bytes: a ping would add nothing.
            if not self.flow.is_write_paused:
                self.transport.write(self.frame)
            self.last_write_at = now
            due_at = now + self.interval_s
        self.handle = self.loop.call_at(due_at, self._tick)

    def cancel(self) -> None:
        self.handle.cancel()


async def stream_response(
    cycle: Cycle,
    transport: Any,
    flow: FlowControl,
    response: StreamingResponse,
    is_draining: bool,
    is_chunked: bool,
    ping_interval_s: float,
) -> Outcome:
    """Send `response`: chunked framing for HTTP/1.1 peers, a close-delimited body for
    HTTP/1.0 ones."""
    iterator = response.body_iterator
    if is_draining or not is_chunked:
        cycle.keep_alive = False
    try:
        head = stream_head(
            response.status,
            response.content_type,
            response.headers,
            cycle.keep_alive,
            is_chunked,
            cycle.server_head,
        )
    except ValueError:
        logger.exception("invalid streaming response from handler for %s", cycle.request.path)
        await aclose_iterator(iterator)
        cycle.status = 500
        transport.write(raw_error_response(500, "Internal server error", (), cycle.server_head))
        return Outcome.BROKEN
    cycle.status = response.status
    cycle.response_started = True
    transport.write(head)
    if cycle.request.method == "HEAD":
        await aclose_iterator(iterator)
        return Outcome.KEEP_ALIVE if cycle.keep_alive else Outcome.CLOSE

    interval_s = response.ping_interval_s
    if interval_s is None:
        interval_s = ping_interval_s
    pinger = None
    if response.ping_frame is not None and interval_s > 0:
        frame = response.ping_frame
        if is_chunked:
            frame = b"%x\r\n%b\r\n" % (len(frame), frame)
        pinger = Pinger(cycle, transport, flow, frame, interval_s)
    is_plain_sse = type(response).encode is EventSourceResponse.encode
    write_chunks = _write_sse if is_chunked and is_plain_sse else _write
    failure: Exception | None = None
    try:
        cycle.num_bytes_sent = await write_chunks(
            cycle, transport, flow, response, is_chunked, pinger
        )
    except Exception as exc:
        failure = exc
    finally:
        if pinger is not None:
            pinger.cancel()
        await aclose_iterator(iterator)

    if cycle.is_disconnected:
        return Outcome.GONE
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
        return Outcome.BROKEN
    if is_chunked:
        transport.write(_LAST_CHUNK)
    return Outcome.KEEP_ALIVE if cycle.keep_alive else Outcome.CLOSE


async def _write(
    cycle: Cycle,
    transport: Any,
    flow: FlowControl,
    response: StreamingResponse,
    is_chunked: bool,
    pinger: Pinger | None,
) -> int:
    loop = asyncio.get_running_loop()
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
        if flow.is_write_paused:
            await flow.drain()
        if cycle.is_disconnected:
            break
    return num_bytes


async def _write_sse(
    cycle: Cycle,
    transport: Any,
    flow: FlowControl,
    response: StreamingResponse,
    is_chunked: bool,
    pinger: Pinger | None,
) -> int:
    """_write for EventSourceResponse, with one-line events framed in one step (hot path)."""
    loop = asyncio.get_running_loop()
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
        if flow.is_write_paused:
            await flow.drain()
        if cycle.is_disconnected:
            break
    return num_bytes
