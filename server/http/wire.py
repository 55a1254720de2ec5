"""Request heads to text, responses to bytes (sans-I/O).

Requests are parsed by h11 and their heads decoded here; responses are written here instead of through h11's writer,
which costs more than the rest of a small request. After each response the connection
gets a fresh h11.Connection (fed any pipelined bytes), so h11 never has to know about a
response it did not send. Framing follows h11's rules: Content-Length for complete
bodies, chunked for streams to HTTP/1.1 peers, close-delimited for HTTP/1.0 peers.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import parse_qsl

import h11

from server.http.errors import REASONS

STATUS_LINES = {
    status: b"HTTP/1.1 %d %s\r\n" % (status, REASONS[status]) for status in range(100, 600)
}
# Framing headers are chosen by the server, never by the handler.
FRAMING_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection"})
_TOKEN_RE = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-zA-Z]+")
_BAD_VALUE_RE = re.compile(rb"[\x00\r\n]")


def new_parser(max_head_bytes: int) -> h11.Connection:
    return h11.Connection(h11.SERVER, max_incomplete_event_size=max_head_bytes)


def decode_head(
    target: bytes, raw_headers: Iterable[tuple[bytes, bytes]]
) -> tuple[str, dict[str, str], dict[str, str], int]:
    """(path, query, headers, num_header_bytes) of a request head, as latin-1 text.

    The path stays percent-encoded (routing matches it raw); repeated headers are joined
    with ", "; names are already lower case (h11).
    """
    raw_path, _, query_string = target.partition(b"?")
    headers: dict[str, str] = {}
    num_header_bytes = 0
    for name, value in raw_headers:
        num_header_bytes += len(name) + len(value) + 4
        key = name.decode("latin-1")
        if key in headers:
            headers[key] += ", " + value.decode("latin-1")
        else:
            headers[key] = value.decode("latin-1")
    query = (
        dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
        if query_string
        else {}
    )
    return raw_path.decode("latin-1"), query, headers, num_header_bytes


def wants_keep_alive(http_version: bytes, connection_header: str | None) -> bool:
    """Same rule as h11: HTTP/1.1 and no "close" token in Connection."""
    if http_version < b"1.1":
        return False
    if connection_header is None:
        return True
    return "close" not in [token.strip() for token in connection_header.lower().split(",")]


def body_allowed(status: int) -> bool:
    return status >= 200 and status != 204 and status != 304


def _head_parts(
    status_line: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]],
    server_head: bytes,
) -> list[bytes]:
    parts = [status_line, server_head]
    has_content_type = False
    for name, value in headers:
        if name in FRAMING_HEADERS:
            continue
        if _TOKEN_RE.fullmatch(name) is None or _BAD_VALUE_RE.search(value) is not None:
            raise ValueError(f"invalid response header {name!r}: {value!r}")
        has_content_type = has_content_type or name == b"content-type"
        parts += (name, b": ", value, b"\r\n")
    if not has_content_type:
        parts.insert(2, b"content-type: %s\r\n" % content_type)
    return parts


def _status_line(status: int) -> bytes:
    status_line = STATUS_LINES.get(status)
    if status_line is None or status < 200:
        raise ValueError(f"invalid response status {status!r}")
    return status_line


def response_bytes(
    status: int,
    content_type: bytes,
    body: bytes,
    headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
    is_head: bool,
    server_head: bytes = b"",
) -> bytes:
    """A complete response with Content-Length; raises ValueError on an invalid header.

    `server_head`: head lines the server adds (request id, CORS), already valid and encoded.
    """
    status_line = _status_line(status)
    if not headers and keep_alive and body_allowed(status):
        head = b"%s%scontent-type: %s\r\ncontent-length: %d\r\n\r\n" % (
            status_line,
            server_head,
            content_type,
            len(body),
        )
        return head if is_head else head + body
    parts = _head_parts(status_line, content_type, headers, server_head)
    if body_allowed(status):
        parts.append(b"content-length: %d\r\n" % len(body))
    else:
        body = b""
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    if not is_head:
        parts.append(body)
    return b"".join(parts)


def stream_head(
    status: int,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]],
    keep_alive: bool,
    is_chunked: bool,
    server_head: bytes = b"",
) -> bytes:
    """The head of a body of unknown length: chunked for HTTP/1.1 peers, else close-delimited."""
    parts = _head_parts(_status_line(status), content_type, headers, server_head)
    if is_chunked:
        parts.append(b"transfer-encoding: chunked\r\n")
    if not keep_alive or not is_chunked:
        parts.append(b"connection: close\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)
