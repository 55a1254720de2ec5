"""What a server shares with each of its connections (uvicorn's ServerState).

HTTPServer owns one ServerState and hands it to every HTTPProtocol it creates, so a
connection reaches the router, the limits, the auth check, the CORS policy, the drain
flag and the registries without knowing the server. It is also the `request.server`
handlers see (they read .is_draining).
"""

from __future__ import annotations

import asyncio
from typing import Any

from server.http.auth import AuthCheck
from server.http.config import ServerConfig
from server.http.cors import CORSPolicy
from server.http.routing import Router


class ServerState:
    __slots__ = ("router", "config", "check_auth", "cors", "is_draining", "connections", "tasks")

    def __init__(self, router: Router, config: ServerConfig, check_auth: AuthCheck | None) -> None:
        self.router = router
        self.config = config
        self.check_auth = check_auth  # None: no API key
        self.cors = CORSPolicy(
            config.allowed_origins, config.allowed_methods, config.allowed_headers
        )
        # True once shutdown began: new requests get 503, in-flight ones may finish.
        self.is_draining = False
        self.connections: set[Any] = set()  # HTTPProtocols, refused ones included
        self.tasks: set[asyncio.Task] = set()  # running handler/stream tasks
