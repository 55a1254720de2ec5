"""GET / and its static files: the chat page, read once when this module is imported.

The page holds no data, so these routes are public (served without the API key); the page
asks for the key when the API answers 401. Every file carries a strict Content-Security-Policy: scripts and styles come only
from these files, fetches go only to this origin, and the page cannot be framed. Responses
carry an ETag and `no-cache`, so a browser revalidates (304) instead of running stale code.
"""

from __future__ import annotations

import hashlib
from importlib import resources

from server.http.messages import Request, Response
from server.http.routing import Router

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)

# URL path -> (file in this package, content type).
ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/webui/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/webui/markdown.js": ("markdown.js", "text/javascript; charset=utf-8"),
    "/webui/style.css": ("style.css", "text/css; charset=utf-8"),
}


class StaticFile:
    """One file's bytes and headers; answers 304 when the client already holds this version."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.body = body
        self.content_type = content_type
        self.etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        self.headers = [
            ("cache-control", "no-cache"),
            ("etag", self.etag),
            ("content-security-policy", CONTENT_SECURITY_POLICY),
            ("x-content-type-options", "nosniff"),
            ("referrer-policy", "no-referrer"),
        ]

    async def __call__(self, request: Request) -> Response:
        if self.etag in request.headers.get("if-none-match", ""):
            return Response(304, b"", self.headers, self.content_type)
        return Response(200, self.body, self.headers, self.content_type)


def load_files() -> dict[str, StaticFile]:
    package = resources.files(__package__)
    return {
        path: StaticFile(package.joinpath(name).read_bytes(), content_type)
        for path, (name, content_type) in ASSETS.items()
    }


FILES = load_files()


def add_webui_routes(router: Router) -> Router:
    """Registers GET (and so HEAD) for the page and its assets on `router`."""
    for path, static_file in FILES.items():
        router.add("GET", path, static_file, public=True)
    return router
