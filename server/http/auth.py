"""The API-key check: "Authorization: Bearer <key>" or "x-api-key: <key>" (Anthropic's header),
compared in constant time.

The connection runs it on every request head whose path is not a public route (Router.add's
`public`: health checks, metrics scrapers, the chat page), before the body is read.
"""

from __future__ import annotations

import functools
import hmac
from collections.abc import Callable

from server.http.errors import HTTPError

AuthCheck = Callable[[str | None, str | None], None]


def check_auth(authorization: str | None, x_api_key: str | None = None, *, api_key: bytes) -> None:
    """Raise HTTPError 401 unless `authorization` is "Bearer <api_key>" or `x_api_key` is
    the key (both compared, in constant time)."""
    token = b""
    if authorization:
        scheme, _, rest = authorization.encode("latin-1").partition(b" ")
        if scheme.lower() == b"bearer":
            token = rest.strip()
    key = x_api_key.encode("latin-1").strip() if x_api_key else b""
    # `|`, not `or`: the second compare runs whatever the first found
    if not (hmac.compare_digest(token, api_key) | hmac.compare_digest(key, api_key)):
        raise HTTPError(
            401,
            "Invalid or missing API key (send 'Authorization: Bearer <key>' or 'x-api-key: <key>')",
            code="invalid_api_key",
            headers=[("www-authenticate", "Bearer")],
        )


def auth_check(api_key: str | None) -> AuthCheck | None:
    """check_auth bound to `api_key`; None when the server has no key (every request passes)."""
    if api_key is None:
        return None
    return functools.partial(check_auth, api_key=api_key.encode())
