"""Request-head limits (sans-I/O): what makes the connection refuse a request before its body.

A refused head is answered with an error and the connection closes (connection.py), as the
rest of the request cannot be trusted or is too large to read.
"""

from __future__ import annotations

from collections.abc import Mapping

import h11

from server.http.config import ServerConfig


def head_rejection(
    event: h11.Request, headers: Mapping[str, str], num_header_bytes: int, config: ServerConfig
) -> tuple[int, str] | None:
    """(status, message) when the head breaks a limit or frames its body ambiguously."""
    if len(event.method) + len(event.target) + 10 > config.max_request_line_bytes:
        return 414, "Request line too long"
    if len(event.headers) > config.max_header_fields:
        return 431, f"Too many header fields (limit {config.max_header_fields})"
    if num_header_bytes > config.max_header_bytes:
        return 431, "Request header fields too large"
    if "content-length" in headers and "transfer-encoding" in headers:
        # RFC 9112 6.1: the two framings may disagree (request smuggling): refuse and close.
        return 400, "Content-Length and Transfer-Encoding must not both be sent"
    if int(headers.get("content-length", 0)) > config.max_body_bytes:
        return 413, f"Request body too large (limit {config.max_body_bytes} bytes)"
    return None
