"""The HTTP/1.1 server: listening socket, connection set, graceful drain, run_server.

The server owns one ServerState (state.py) and hands it to each HTTPProtocol it creates;
it reaches its connections only to close them at shutdown. Handlers and response types
are re-exported here, so one import gives the whole surface:
    from server.http.server import (EventSourceResponse, HTTPServer, JSONResponse, Request,
                                    Response, ServerConfig, StreamingResponse, run_server)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable

from server.http.auth import auth_check
from server.http.config import ServerConfig
from server.http.connection import HTTPProtocol
from server.http.errors import HTTPError
from server.http.messages import Handler, JSONResponse, Request, Response, StreamingResponse
from server.http.routing import Router
from server.http.sse import EventSourceResponse
from server.http.state import ServerState

__all__ = [
    "EventSourceResponse",
    "HTTPError",
    "HTTPServer",
    "Handler",
    "JSONResponse",
    "Request",
    "Response",
    "Router",
    "ServerConfig",
    "StreamingResponse",
    "run_server",
]


logger = logging.getLogger("nanoserve.http")


class HTTPServer:
    """Serves `router` on config.host:config.port; one HTTPProtocol per connection."""

    def __init__(self, router: Router, config: ServerConfig) -> None:
        self.router = router
        self.config = config
        self.port = config.port
        # Raises HTTPError 401 unless the Authorization header carries the key; None: no key.
        self.check_auth = auth_check(config.api_key)
        self.state = state = ServerState(router, config, self.check_auth)
        self.connections: set[HTTPProtocol] = state.connections
        self.tasks: set[asyncio.Task] = state.tasks  # running handler/stream tasks
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._stop_waiting: asyncio.Event | None = None

    @property
    def is_draining(self) -> bool:
        """True once shutdown began: new requests get 503, in-flight ones may finish."""
        return self.state.is_draining

    async def start(self) -> None:
        """Bind and start accepting; self.port is the real port afterwards (port=0 allowed)."""
        self.loop = asyncio.get_running_loop()
        self._stop_waiting = asyncio.Event()
        self._server = await self.loop.create_server(
            lambda: HTTPProtocol(self.state),
            self.config.host,
            self.config.port,
            reuse_address=True,
            backlog=min(self.config.max_connections, 4096),
        )
        self.port = self._server.sockets[0].getsockname()[1]
        logger.info("listening on http://%s:%d", self.config.host, self.port)

    async def shutdown(self) -> None:
        """Stop accepting; new requests get 503; in-flight requests get shutdown_timeout_s
        seconds to finish, then are cancelled; finally every connection is closed."""
        if self._server is None:
            return
        server, self._server = self._server, None
        self.state.is_draining = True
        server.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_timeout_s
        if self.tasks:
            logger.info("draining %d in-flight requests", len(self.tasks))
        stop_waiting = asyncio.ensure_future(self._stop_waiting.wait())
        try:
            while self.tasks and not self._stop_waiting.is_set():
                remaining_s = deadline - loop.time()
                if remaining_s <= 0:
                    break
                await asyncio.wait(
                    [*self.tasks, stop_waiting],
                    timeout=remaining_s,
                    return_when=asyncio.FIRST_COMPLETED,
                )
        finally:
            stop_waiting.cancel()
        if self.tasks:
            logger.warning("cancelling %d requests still running at shutdown", len(self.tasks))
            for task in list(self.tasks):
                task.cancel()
            await asyncio.wait(list(self.tasks), timeout=1.0)
        for proto in list(self.connections):
            proto.close_now()
        await server.wait_closed()
        # Let connection_lost callbacks (disconnect callbacks included) run.
        for _ in range(3):
            await asyncio.sleep(0)

    def stop_waiting(self) -> None:
        """Cut a running shutdown's drain short: in-flight requests are cancelled now."""
        if self._stop_waiting is not None:
            self._stop_waiting.set()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop loop when uvloop is importable, else asyncio's default."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_server(
    router: Router,
    config: ServerConfig,
    on_startup: Callable[[], Awaitable[None]] | None = None,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT, then shut down gracefully; returns the exit code.

    on_startup runs as a task once the socket is bound (connections are accepted while
    it runs); if it fails the server shuts down and the exit code is 1.
    on_shutdown runs after the last connection closed.
    """
    loop = new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(_serve(router, config, on_startup, on_shutdown))
    except KeyboardInterrupt:  # only when signal handlers could not be installed
        return 130
    finally:
        try:
            _cancel_remaining_tasks(loop)
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


async def _serve(
    router: Router,
    config: ServerConfig,
    on_startup: Callable[[], Awaitable[None]] | None,
    on_shutdown: Callable[[], Awaitable[None]] | None,
) -> int:
    loop = asyncio.get_running_loop()
    server = HTTPServer(router, config)
    try:
        await server.start()
    except OSError as exc:
        logger.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        return 1
    stop = asyncio.Event()
    exit_code = 0

    def on_signal(signum: int) -> None:
        if stop.is_set():
            logger.warning("second %s: cancelling in-flight requests", signal.Signals(signum).name)
            server.stop_waiting()
        else:
            logger.info("%s received, shutting down", signal.Signals(signum).name)
            stop.set()

    installed = []
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal, signum)
            installed.append(signum)

    startup_task = None
    if on_startup is not None:

        def startup_done(task: asyncio.Task) -> None:
            nonlocal exit_code
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                logger.error("startup failed: %s", exc, exc_info=exc)
                exit_code = 1
                stop.set()

        startup_task = loop.create_task(on_startup())
        startup_task.add_done_callback(startup_done)
    try:
        await stop.wait()
    finally:
        if startup_task is not None and not startup_task.done():
            startup_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await startup_task
        await server.shutdown()
        if on_shutdown is not None:
            try:
                await on_shutdown()
            except Exception:
                logger.exception("shutdown hook failed")
                exit_code = 1
        for signum in installed:
            loop.remove_signal_handler(signum)
    logger.info("server stopped")
    return exit_code


def _cancel_remaining_tasks(loop: asyncio.AbstractEventLoop) -> None:
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
