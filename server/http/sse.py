"""Server-sent events: framing of `data:` events (named ones too), keep-alive pings, in-stream errors."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from server.http.errors import HTTPError, error_body
from server.http.messages import HeadersArg, StreamingResponse

PING_FRAME = b": ping\n\n"

_SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]


def encode_event(item: str | bytes | dict | list) -> bytes:
    """One `data:` event. dict/list -> orjson; multi-line text becomes one data line per line."""
    if type(item) is bytes:
        data = item
    elif type(item) is str:
        data = item.encode()
    elif isinstance(item, (dict, list)):
        return b"data: " + orjson.dumps(item) + b"\n\n"  # orjson never emits newlines
    elif isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
    elif isinstance(item, str):
        data = item.encode()
    else:
        raise TypeError(f"SSE event must be str, bytes, dict or list, not {type(item).__name__}")
    if b"\n" in data or b"\r" in data:
        lines = data.splitlines() or [b""]
        return b"".join([b"data: " + line + b"\n" for line in lines]) + b"\n"
    return b"data: " + data + b"\n\n"


def encode_named_event(name: str, item: str | bytes | dict | list) -> bytes:
    """One event with an "event: <name>" line before its data (APIs that name their events)."""
    if "\n" in name or "\r" in name:
        raise ValueError(f"an SSE event name is one line, not {name!r}")
    return b"event: " + name.encode() + b"\n" + encode_event(item)


def error_event(exc: BaseException) -> bytes:
    """The event sent when a stream fails after it started: data: {"error": {...}}."""
    if isinstance(exc, HTTPError):
        body = exc.body()
    else:
        body = error_body(500, "Internal server error")
    return b"data: " + body + b"\n\n"


class EventSourceResponse(StreamingResponse):
    """text/event-stream: each item becomes "data: <item>\\n\\n" (dict/list -> JSON).

    A ": ping" comment is sent after `ping_interval_s` seconds without an event
    (None: the server's ServerConfig.sse_ping_interval_s).
    """

    ping_frame = PING_FRAME

    def __init__(
        self,
        events: AsyncIterator[Any],
        status: int = 200,
        headers: HeadersArg = None,
        ping_interval_s: float | None = None,
    ) -> None:
        super().__init__(events, status, headers, "text/event-stream")
        given = {name for name, _ in self.headers}
        self.headers.extend(h for h in _SSE_HEADERS if h[0] not in given)
        self.ping_interval_s = ping_interval_s

    def encode(self, item: Any) -> bytes:
        return encode_event(item)

    def error_frame(self, exc: BaseException) -> bytes | None:
        return error_event(exc)


class TypedEventSourceResponse(EventSourceResponse):
    """SSE whose items are dicts carrying "type": each is sent as `event: <type>` + `data:`
    (the Responses and Anthropic streams)."""

    def encode(self, item: dict) -> bytes:
        return encode_named_event(item["type"], item)
