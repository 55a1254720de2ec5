"""Request ids (sans-I/O): the client's X-Request-Id when it is safe to echo, else a new one.

Every response carries the id as x-request-id (the openai SDKs expose it as request_id) and
the access log prints it. A client id is echoed only when it is 1..MAX_REQUEST_ID_CHARS
printable ASCII characters, so it can go into a header and a log line as it is.
Client ids may repeat: whoever needs a unique key (the engine) must add its own suffix.
"""

from __future__ import annotations

import re
import uuid

MAX_REQUEST_ID_CHARS = 128
_VALID_RE = re.compile(rf"[\x20-\x7e]{{1,{MAX_REQUEST_ID_CHARS}}}")


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_of(header: str | None) -> str:
    """The client's id when valid (`header` is the X-Request-Id value), else a new one."""
    if header is not None and _VALID_RE.fullmatch(header) is not None:
        return header
    return new_request_id()


def request_id_line(request_id: str) -> bytes:
    """The response head line; request ids are printable ASCII by construction."""
    return b"x-request-id: %s\r\n" % request_id.encode("ascii")
