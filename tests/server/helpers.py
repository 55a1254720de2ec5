"""Shared helpers for the HTTP core tests: a server in a background thread, a raw client."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

import orjson

from server.http.config import ServerConfig
from server.http.routing import Router
from server.http.server import HTTPServer, new_event_loop

# Short limits so every timeout test takes well under a second.
FAST = dict(
    header_timeout_s=0.5,
    body_timeout_s=0.5,
    timeout_keep_alive_s=0.5,
    shutdown_timeout_s=1.0,
    sse_ping_interval_s=15.0,
)


def fast_config(**overrides: Any) -> ServerConfig:
    return ServerConfig(port=0, **{**FAST, **overrides})


class ServerThread:
    """Runs an HTTPServer on its own event loop (uvloop) in a daemon thread.

    Fails the test on exit if the loop reported an unhandled error.
    """

    def __init__(self, router: Router, config: ServerConfig | None = None) -> None:
        self.router = router
        self.config = config or fast_config()
        self.loop = new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.loop_errors: list[dict] = []
        self.server: HTTPServer | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-http-server", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        self.loop_errors.append(context)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = HTTPServer(self.router, self.config)
            self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # reported to the test thread
            self._start_error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        self._ready.wait(10)
        if self._start_error is not None:
            raise self._start_error
        return self

    def run(self, coro: Coroutine, timeout_s: float = 10.0) -> Any:
        """Run a coroutine on the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], Any], timeout_s: float = 10.0) -> Any:
        """Call a plain function on the server's loop and return its result."""

        async def wrapper() -> Any:
            return fn()

        return self.run(wrapper(), timeout_s)

    def __exit__(self, *exc_info: object) -> None:
        try:
            if self._thread.is_alive():
                self.run(self.server.shutdown(), timeout_s=30)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            pending = [t for t in asyncio.all_tasks(self.loop) if not t.done()]
            for task in pending:
                task.cancel()
            if pending:
                self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()
        assert not self.loop_errors, f"event loop reported errors: {self.loop_errors}"


@dataclass
class Reply:
    status: int
    reason: str
    headers: dict[str, str]
    body: bytes = b""
    header_list: list[tuple[str, str]] = field(default_factory=list)

    def json(self) -> Any:
        return orjson.loads(self.body)


class Client:
    """A minimal blocking HTTP/1.1 client over one raw socket (pipelining-friendly)."""

    def __init__(self, port: int, timeout_s: float = 5.0, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(timeout_s)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        read: bool = True,
    ) -> Reply | None:
        self.send(request_bytes(method, path, body, headers))
        return self.read_response(is_head=method == "HEAD") if read else None

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buffer += chunk

    def _read_until(self, separator: bytes) -> bytes:
        while separator not in self.buffer:
            self._fill()
        data, self.buffer = self.buffer.split(separator, 1)
        return data

    def _read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            self._fill()
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def read_head(self) -> Reply:
        head = self._read_until(b"\r\n\r\n").decode("latin-1")
        status_line, *lines = head.split("\r\n")
        _, status, *reason = status_line.split(" ", 2)
        header_list = [tuple(part.strip() for part in line.split(":", 1)) for line in lines]
        headers: dict[str, str] = {}
        for name, value in header_list:
            name = name.lower()
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return Reply(int(status), reason[0] if reason else "", headers, b"", header_list)

    def read_chunk(self) -> bytes | None:
        """One chunk of a chunked body; None for the last (empty) chunk."""
        size = int(self._read_until(b"\r\n").split(b";")[0], 16)
        if size == 0:
            self._read_until(b"\r\n")
            return None
        data = self._read_exactly(size)
        assert self._read_exactly(2) == b"\r\n"
        return data

    def read_response(self, is_head: bool = False) -> Reply:
        reply = self.read_head()
        if is_head or reply.status in (204, 304) or reply.status < 200:
            return reply
        if reply.headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while (chunk := self.read_chunk()) is not None:
                parts.append(chunk)
            reply.body = b"".join(parts)
        elif "content-length" in reply.headers:
            reply.body = self._read_exactly(int(reply.headers["content-length"]))
        else:
            reply.body = self.read_to_eof()
        return reply

    def read_to_eof(self) -> bytes:
        try:
            while True:
                self._fill()
        except (EOFError, ConnectionResetError):
            pass
        data, self.buffer = self.buffer, b""
        return data

    def is_closed_by_server(self, timeout_s: float = 2.0) -> bool:
        """True when the server closes the connection within timeout_s (pending data dropped)."""
        deadline = time.monotonic() + timeout_s
        self.sock.settimeout(0.05)
        try:
            while time.monotonic() < deadline:
                try:
                    if not self.sock.recv(65536):
                        return True
                except TimeoutError:
                    continue
                except ConnectionResetError:
                    return True
            return False
        finally:
            self.sock.settimeout(5.0)


class BytesReader(Client):
    """Client's response parsing over bytes already received (protocol unit tests)."""

    def __init__(self, data: bytes) -> None:
        self.buffer = bytes(data)

    def _fill(self) -> None:
        raise EOFError("no more bytes")

    def close(self) -> None:
        pass

    def read_all(self) -> list[Reply]:
        replies = []
        while self.buffer:
            replies.append(self.read_response())
        return replies


def request_bytes(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    headers = dict(headers or {})
    if body and "transfer-encoding" not in {k.lower() for k in headers}:
        headers.setdefault("Content-Length", str(len(body)))
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()
