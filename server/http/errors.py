"""HTTP errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from http import HTTPStatus

import orjson

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    414: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


# Every 503 (loading, shutting down, too many connections) says when to come back: clients such
# as the openai SDK honour Retry-After, and without it their default retries give up at once.
RETRY_AFTER_S = 1


def with_retry_after(status: int, headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    if status == 503 and not any(k.lower() == "retry-after" for k, _ in headers):
        return [*headers, ("retry-after", str(RETRY_AFTER_S))]
    return headers


def default_error_type(status: int) -> str:
    """The OpenAI error `type` used when a handler does not name one."""
    found = _TYPE_BY_STATUS.get(status)
    if found is not None:
        return found
    return "invalid_request_error" if status < 500 else "server_error"


def reason_phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


REASONS = {status: reason_phrase(status).encode() for status in range(100, 600)}


def error_body(
    status: int,
    message: str,
    type: str | None = None,
    param: str | None = None,
    code: str | int | None = None,
) -> bytes:
    """JSON bytes of an OpenAI-shaped error object."""
    if code is None and status == 500:
        code = "internal_server_error"
    return orjson.dumps(
        {
            "error": {
                "message": message,
                "type": type or default_error_type(status),
                "param": param,
                "code": code,
            }
        }
    )


class HTTPError(Exception):
    """A client-facing error: raised by handlers, turned into one JSON error response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | int | None = None,
        headers: list[tuple[str, str]] | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"HTTPError status must be 4xx or 5xx, got {status}")
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = with_retry_after(status, list(headers) if headers else [])

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.type, self.param, self.code)

    def __repr__(self) -> str:
        return f"HTTPError({self.status}, {self.message!r})"


def raw_error_response(
    status: int,
    message: str,
    headers: list[tuple[str, str]] | tuple = (),
    server_head: bytes = b"",
    body: bytes | None = None,
) -> bytes:
    """A complete HTTP/1.1 error response that closes the connection (no parser state needed).

    `server_head`: head lines the server adds (request id, CORS), already encoded; `body`:
    the JSON error body (None: the OpenAI-shaped one of `status` and `message`)."""
    if body is None:
        body = error_body(status, message)
    head = [b"HTTP/1.1 %d %s\r\n" % (status, REASONS.get(status, b"")), server_head]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    headers = with_retry_after(status, list(headers))
    head.extend(b"%s: %s\r\n" % (k.encode("latin-1"), v.encode("latin-1")) for k, v in headers)
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body
