"""Method + path -> handler. Sans-I/O: raises HTTPError 404/405, never touches a socket.

Paths are matched on the raw (still percent-encoded) request path, so an encoded "/"
inside a parameter never splits it; parameter values are percent-decoded afterwards.
A segment "{name}" matches one path segment, "{name:path}" matches the rest of the path,
slashes included (model ids such as "org/model").
An API whose errors have another shape registers an error format for its paths; the
connection passes the errors it answers itself (auth, limits, no route) through it.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

from server.http.errors import HTTPError

Handler = Callable[[Any], Awaitable[Any]]
ErrorFormat = Callable[[HTTPError], HTTPError]

_PARAM_RE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?\}")
_METHOD_RE = re.compile(r"[A-Z]+")


def _compile(path: str) -> re.Pattern[str]:
    pattern = []
    pos = 0
    for m in _PARAM_RE.finditer(path):
        pattern.append(re.escape(path[pos : m.start()]))
        name, kind = m.group(1), m.group(2)
        pattern.append(f"(?P<{name}>.+)" if kind == "path" else f"(?P<{name}>[^/]+)")
        pos = m.end()
    pattern.append(re.escape(path[pos:]))
    return re.compile("".join(pattern))


class Router:
    """Routes (method, path) to handlers; HEAD is served by the GET handler unless one is added."""

    def __init__(self) -> None:
        self._static: dict[str, dict[str, Handler]] = {}
        self._dynamic: list[tuple[str, re.Pattern[str], dict[str, Handler]]] = []
        self._error_formats: list[tuple[str, ErrorFormat]] = []
        self._public: set[str] = set()  # paths served without the API key

    def add(self, method: str, path: str, handler: Handler, public: bool = False) -> None:
        """`public`: the path is served without the API key (health checks, metrics scrapers,
        the chat page's files)."""
        method = method.upper()
        if not _METHOD_RE.fullmatch(method):
            raise ValueError(f"bad HTTP method {method!r}")
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        if public and _PARAM_RE.search(path) is not None:
            raise ValueError(f"only fixed paths can be public: {path!r}")
        if _PARAM_RE.search(path) is None:
            methods = self._static.setdefault(path, {})
        else:
            for known_path, _, known in self._dynamic:
                if known_path == path:
                    methods = known
                    break
            else:
                methods = {}
                self._dynamic.append((path, _compile(path), methods))
        if method in methods:
            raise ValueError(f"route {method} {path} is already registered")
        methods[method] = handler
        if public:
            self._public.add(path)

    def add_error_format(self, path_prefix: str, convert: ErrorFormat) -> None:
        """Errors answered for `path_prefix` and the paths below it become `convert(error)`."""
        if not path_prefix.startswith("/"):
            raise ValueError(f"error format prefix must start with '/': {path_prefix!r}")
        self._error_formats.append((path_prefix.rstrip("/"), convert))

    def is_public(self, path: str) -> bool:
        return path in self._public

    def error_for(self, path: str, error: HTTPError) -> HTTPError:
        """`error` in the format registered for `path` (unchanged when none is)."""
        for prefix, convert in self._error_formats:
            if path == prefix or path.startswith(prefix + "/"):
                return convert(error)
        return error

    def get(self, path: str) -> Callable[[Handler], Handler]:
        """Decorator form of add("GET", path, handler)."""
        return self._decorator("GET", path)

    def post(self, path: str) -> Callable[[Handler], Handler]:
        """Decorator form of add("POST", path, handler)."""
        return self._decorator("POST", path)

    def _decorator(self, method: str, path: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(method, path, handler)
            return handler

        return register

    def match(self, method: str, path: str) -> tuple[Handler, dict[str, str]]:
        """Return (handler, path_params) or raise HTTPError 404 / 405 (with an Allow header)."""
        params: dict[str, str] = {}
        methods = self._static.get(path)
        if methods is None:
            for _, regex, candidate in self._dynamic:
                m = regex.fullmatch(path)
                if m is not None:
                    methods = candidate
                    params = {k: unquote(v) for k, v in m.groupdict().items()}
                    break
            else:
                raise HTTPError(404, f"Not found: {path}")
        handler = methods.get(method)
        if handler is None and method == "HEAD":
            handler = methods.get("GET")
        if handler is None:
            allowed = sorted(set(methods) | ({"HEAD"} if "GET" in methods else set()))
            raise HTTPError(
                405,
                f"Method {method} not allowed for {path}",
                headers=[("allow", ", ".join(allowed))],
            )
        return handler, params
