"""CORS (sans-I/O): request headers in, response headers out; Starlette's CORSMiddleware rules.

A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered by the
connection before auth and routing: 204 with the allow headers, or 400 naming what is not
allowed (origin, method, headers), without Access-Control-Allow-Origin for a disallowed
origin. Every other response to a request with an allowed Origin gets
Access-Control-Allow-Origin ("*" when any origin is allowed, else the origin itself plus
"Vary: Origin") and Access-Control-Expose-Headers, as head lines made once per request.
No credentials mode: the API key travels in Authorization, which a preflight may request.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from server.http.errors import HTTPError
from server.http.messages import Request, Response

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
# Requests may always send these (the Fetch standard's CORS-safelisted request headers).
SAFELISTED_HEADERS = frozenset({"accept", "accept-language", "content-language", "content-type"})
# Readable by browser code: the request id, and Retry-After for the SDKs' retry logic.
EXPOSE_HEADERS = "x-request-id, retry-after"
MAX_AGE_S = 600


def is_preflight(method: str, headers: Mapping[str, str]) -> bool:
    return (
        method == "OPTIONS" and "origin" in headers and "access-control-request-method" in headers
    )


class CORSPolicy:
    def __init__(
        self, origins: Iterable[str], methods: Iterable[str], headers: Iterable[str]
    ) -> None:
        origins, methods, headers = tuple(origins), tuple(methods), tuple(headers)
        self.is_any_origin = "*" in origins
        self.origins = frozenset(origins)
        self.is_any_method = "*" in methods
        self.methods = ALL_METHODS if self.is_any_method else tuple(m.upper() for m in methods)
        self.is_any_header = "*" in headers
        self.headers = SAFELISTED_HEADERS | {h.lower() for h in headers}
        self._any_origin_head = (
            b"access-control-allow-origin: *\r\naccess-control-expose-headers: %s\r\n"
            % EXPOSE_HEADERS.encode()
        )

    def is_allowed_origin(self, origin: str) -> bool:
        return self.is_any_origin or origin in self.origins

    def response_head(self, origin: str | None) -> bytes:
        """Head lines for a (non-preflight) response to a request with this Origin; b"": none."""
        if origin is None:
            return b""
        if self.is_any_origin:
            return self._any_origin_head
        if origin not in self.origins:
            return b""
        return (
            b"access-control-allow-origin: %s\r\nvary: Origin\r\n"
            b"access-control-expose-headers: %s\r\n"
            % (origin.encode("latin-1"), EXPOSE_HEADERS.encode())
        )

    def preflight(self, headers: Mapping[str, str]) -> tuple[list[tuple[str, str]], str | None]:
        """(response headers, None) for an allowed preflight, else (headers, error message)."""
        origin = headers["origin"]
        out: list[tuple[str, str]] = []
        failures = []
        if self.is_any_origin:
            out.append(("access-control-allow-origin", "*"))
        elif origin in self.origins:
            out += [("access-control-allow-origin", origin), ("vary", "Origin")]
        else:
            out.append(("vary", "Origin"))
            failures.append("origin")
        if headers["access-control-request-method"] not in self.methods:
            failures.append("method")
        requested = headers.get("access-control-request-headers", "")
        names = [name.strip().lower() for name in requested.split(",") if name.strip()]
        if self.is_any_header:
            # "*" does not cover Authorization in browsers: echo what was asked for.
            allowed_headers = ", ".join(names)
        else:
            allowed_headers = ", ".join(sorted(self.headers))
            if any(name not in self.headers for name in names):
                failures.append("headers")
        out.append(("access-control-allow-methods", ", ".join(self.methods)))
        if allowed_headers:
            out.append(("access-control-allow-headers", allowed_headers))
        out.append(("access-control-max-age", str(MAX_AGE_S)))
        if failures:
            return out, f"Disallowed CORS {', '.join(failures)}"
        return out, None


async def answer_preflight(request: Request) -> Response:
    """The handler of a preflight, which the connection runs before auth and routing."""
    headers, failure = request.server.cors.preflight(request.headers)
    if failure is not None:
        raise HTTPError(400, failure, headers=headers)
    return Response(204, b"", headers, content_type="text/plain")
