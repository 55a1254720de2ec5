"""Request and response objects handed to and returned by handlers (no I/O here)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.http.errors import HTTPError
from server.http.request_id import new_request_id

logger = logging.getLogger("nanoserve.http")

HeadersArg = Mapping[str, str] | Iterable[tuple[str, str]] | None


class RequestCycle:
    """Per-request state shared by the connection and the handler's Request.

    The connection marks it disconnected the moment the client goes away; callbacks
    registered by the handler (e.g. an engine abort) run at once, in registration order.
    """

    __slots__ = ("is_disconnected", "response_started", "_callbacks")

    def __init__(self) -> None:
        self.is_disconnected = False
        self.response_started = False
        self._callbacks: list[Callable[[], None]] | None = None

    def add_disconnect_callback(self, callback: Callable[[], None]) -> None:
        if self.is_disconnected:
            _call(callback)
            return
        if self._callbacks is None:
            self._callbacks = []
        self._callbacks.append(callback)

    def mark_disconnected(self) -> None:
        if self.is_disconnected:
            return
        self.is_disconnected = True
        callbacks, self._callbacks = self._callbacks, None
        if callbacks:
            for callback in callbacks:
                _call(callback)


def _call(callback: Callable[[], None]) -> None:
    try:
        callback()
    except Exception:
        logger.exception("disconnect callback %r failed", callback)


@dataclass(eq=False)
class Request:
    """One parsed HTTP request with its full body."""

    method: str
    path: str
    query: dict[str, str] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)
    client: tuple[str, int] | None = None
    # The serving server's ServerState (None in unit tests); handlers read .is_draining.
    server: Any = field(default=None, repr=False)
    cycle: RequestCycle = field(default_factory=RequestCycle, repr=False)
    # The client's X-Request-Id when valid, else a new one (request_id.py); sent back as
    # x-request-id. Not unique: clients may send the same id twice.
    request_id: str = field(default_factory=new_request_id)

    def json(self) -> Any:
        """The body parsed with orjson; HTTPError 400 when it is not valid JSON."""
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError as exc:
            raise HTTPError(400, f"Request body is not valid JSON: {exc}") from None

    @property
    def is_disconnected(self) -> bool:
        return self.cycle.is_disconnected

    def add_disconnect_callback(self, cb: Callable[[], None]) -> None:
        """Call cb (no arguments, from the event loop) as soon as the client disconnects.

        Runs at once when the client is already gone. Exceptions are logged, not raised.
        """
        self.cycle.add_disconnect_callback(cb)


def encode_headers(headers: HeadersArg) -> list[tuple[bytes, bytes]]:
    if not headers:
        return []
    items = headers.items() if isinstance(headers, Mapping) else headers
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in items]


class Response:
    """A complete response body, sent with Content-Length."""

    __slots__ = ("status", "body", "headers", "content_type")

    def __init__(
        self,
        status: int = 200,
        body: bytes | str = b"",
        headers: HeadersArg = None,
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else bytes(body)
        self.headers = encode_headers(headers)
        self.content_type = content_type.encode("latin-1")


class JSONResponse(Response):
    """`content` serialised with orjson."""

    __slots__ = ()

    def __init__(self, content: Any, status: int = 200, headers: HeadersArg = None) -> None:
        super().__init__(status, orjson.dumps(content), headers, "application/json")


class StreamingResponse:
    """A body of unknown length sent with chunked transfer encoding, one chunk per item.

    The server closes the iterator (aclose) when the client disconnects or the stream ends.
    """

    # A frame written after this many seconds of silence; None: never.
    ping_frame: bytes | None = None

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        status: int = 200,
        headers: HeadersArg = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        self.body_iterator = chunks
        self.status = status
        self.headers = encode_headers(headers)
        self.content_type = content_type.encode("latin-1")
        self.ping_interval_s: float | None = None

    def encode(self, item: Any) -> bytes:
        """Bytes to send for one item of the iterator."""
        if isinstance(item, str):
            return item.encode()
        return bytes(item)

    def error_frame(self, exc: BaseException) -> bytes | None:
        """Bytes that tell the client the stream failed; None: just close the connection."""
        return None


Handler = Callable[[Request], Awaitable[Response | StreamingResponse]]
