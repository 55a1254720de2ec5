"""One HTTP/1.1 connection: a thin asyncio.Protocol adapter around h11.Connection.

HTTPProtocol holds the per-connection state (parser, phase, deadlines, limits,
pipelining, access log, closing) and a FlowControl for write backpressure. Each request
gets a Cycle (exchange.py), also held by the handler's Request; run_cycle answers it in a
task and returns an Outcome that the connection acts on (next pipelined request, close,
abort). What the server shares comes in as a ServerState (state.py).
Phases of a connection:
    IDLE     waiting for a request head (keep-alive deadline, then header deadline)
    BODY     head parsed, reading the body (body-stall deadline)
    BUSY     handler running / response being written; pipelined bytes wait in h11
    CLOSING  an error response went out or the socket is closing; reads are dropped
The socket is read in every phase, so a client that goes away is seen at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import unquote

import h11

from server.http.access_log import log_access
from server.http.cors import answer_preflight, is_preflight
from server.http.errors import HTTPError, raw_error_response
from server.http.exchange import Cycle, Outcome, run_cycle, send_error
from server.http.flow_control import FlowControl
from server.http.limits import head_rejection
from server.http.messages import Request
from server.http.request_id import new_request_id, request_id_line, request_id_of
from server.http.state import ServerState
from server.http.wire import decode_head, new_parser, wants_keep_alive

logger = logging.getLogger("nanoserve.http")

IDLE, BODY, BUSY, CLOSING = 0, 1, 2, 3

# After an error response the socket is half-closed and drained for at most this long, so
# the client reads the response instead of a reset caused by its unread request bytes.
LINGER_S = 1.0
# Pipelined bytes buffered while a response is in progress before reading pauses.
MAX_PIPELINED_BYTES = 256 * 1024


class HTTPProtocol(asyncio.Protocol):
    def __init__(self, state: ServerState) -> None:
        self.state = state
        self.config = config = state.config
        self.loop = loop = asyncio.get_running_loop()
        self.max_head_bytes = config.max_request_line_bytes + config.max_header_bytes
        self.conn = new_parser(self.max_head_bytes)
        self.transport: Any = None
        self.client: tuple[str, int] | None = None
        self.phase = IDLE
        self.is_closed = False
        self.cycle: Cycle | None = None
        # One timer enforces whichever deadline applies (keep-alive, header, body); moving
        # a deadline later only stores it, the timer re-arms itself when it fires early.
        self.deadline: float | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.linger_timer: asyncio.TimerHandle | None = None
        self.is_head_started = True
        self.num_pipelined_bytes = 0
        self.is_read_paused = False
        self.flow = FlowControl(loop)

    # ---- asyncio.Protocol callbacks

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        connections = self.state.connections
        is_over_limit = len(connections) >= self.config.max_connections
        connections.add(self)  # refused ones too, so shutdown closes them
        if is_over_limit:
            logger.warning("max_connections=%d reached, refusing", self.config.max_connections)
            transport.write(
                raw_error_response(
                    503,
                    "Too many connections, retry later",
                    (),
                    request_id_line(new_request_id()),
                )
            )
            self._linger_close()
            return
        transport.set_write_buffer_limits(high=self.config.write_high_water_bytes)
        self._set_deadline(self.config.header_timeout_s)

    def data_received(self, data: bytes) -> None:
        phase = self.phase
        if phase == CLOSING:
            return
        self.conn.receive_data(data)
        if phase == BUSY:
            self.num_pipelined_bytes += len(data)
            if self.num_pipelined_bytes > MAX_PIPELINED_BYTES and not self.is_read_paused:
                self.is_read_paused = True
                self.transport.pause_reading()
            return
        if not self.is_head_started:
            self.is_head_started = True
            self._set_deadline(self.config.header_timeout_s)
        self._process_events()

    def connection_lost(self, exc: Exception | None) -> None:
        self.is_closed = True
        self.phase = CLOSING
        self.state.connections.discard(self)
        self.deadline = None
        for timer in (self.timer, self.linger_timer):
            if timer is not None:
                timer.cancel()
        cycle = self.cycle
        if cycle is not None and not cycle.is_disconnected:
            cycle.mark_disconnected()
            # A stream may be blocked inside its iterator: interrupt it so it is closed now.
            if cycle.response_started and cycle.task is not None:
                cycle.task.cancel()
        self.flow.close()

    def pause_writing(self) -> None:
        self.flow.pause_writing()

    def resume_writing(self) -> None:
        self.flow.resume_writing()

    # ---- deadlines

    def _set_deadline(self, delay_s: float) -> None:
        deadline = self.loop.time() + delay_s
        self.deadline = deadline
        if self.timer is None or self.timer_at > deadline:
            if self.timer is not None:
                self.timer.cancel()
            self.timer = self.loop.call_at(deadline, self._on_deadline)
            self.timer_at = deadline

    def _on_deadline(self) -> None:
        self.timer = None
        deadline = self.deadline
        if deadline is None or self.phase == BUSY or self.phase == CLOSING:
            return
        if self.loop.time() < deadline:
            self.timer = self.loop.call_at(deadline, self._on_deadline)
            self.timer_at = deadline
            return
        self.deadline = None
        if self.phase == BODY:
            self._reject(408, "Timed out waiting for the request body")
        elif self.conn.trailing_data[0]:
            self._reject(408, "Timed out waiting for the request headers")
        else:
            self._close()  # an idle keep-alive connection

    # ---- reading a request

    def _process_events(self) -> None:
        conn = self.conn
        while self.phase == IDLE or self.phase == BODY:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._on_protocol_error(exc)
                return
            kind = type(event)
            if kind is h11.Request:
                self._on_request_head(event)
            elif kind is h11.Data:
                self._on_body(event.data)
            elif kind is h11.EndOfMessage:
                self._on_request_complete()
                conn = self.conn  # replaced when a response completed synchronously
            elif event is h11.NEED_DATA:
                self._on_need_data()
                return
            else:  # PAUSED or ConnectionClosed: nothing to read now
                return

    def _on_need_data(self) -> None:
        conn = self.conn
        if self.phase == BODY:
            if conn.they_are_waiting_for_100_continue:
                continue_response = h11.InformationalResponse(
                    status_code=100, headers=[], reason=b"Continue"
                )
                self.transport.write(conn.send(continue_response))
            return
        buffered = conn.trailing_data[0]
        if buffered:
            if not self.is_head_started:
                self.is_head_started = True
                self._set_deadline(self.config.header_timeout_s)
            self._check_partial_head(buffered)

    def _check_partial_head(self, buffered: bytes) -> bool:
        """Refuse an incomplete head that is already over a limit; True when refused."""
        config = self.config
        line_end = buffered.find(b"\n", 0, config.max_request_line_bytes + 2)
        if line_end < 0 and len(buffered) > config.max_request_line_bytes:
            self._reject(414, "Request line too long")
            return True
        if line_end >= 0 and len(buffered) - line_end > config.max_header_bytes + 4:
            self._reject(431, "Request header fields too large")
            return True
        return False

    def _on_protocol_error(self, exc: h11.RemoteProtocolError) -> None:
        status = exc.error_status_hint
        if status == 431:
            if not self._check_partial_head(self.conn.trailing_data[0]):
                self._reject(431, "Request header fields too large")
        else:
            self._reject(status, f"Malformed HTTP request: {exc}")

    def _on_request_head(self, event: h11.Request) -> None:
        config = self.config
        state = self.state
        self.phase = BODY
        self._set_deadline(config.body_timeout_s)
        path, query, headers, num_header_bytes = decode_head(event.target, event.headers)
        self.cycle = cycle = Cycle()
        request_id = request_id_of(headers.get("x-request-id"))
        cycle.request = request = Request(
            event.method.decode("ascii"),
            unquote(path) if "%" in path else path,
            query,
            headers,
            b"",
            {},
            self.client,
            state,
            cycle,
            request_id,
        )
        cycle.server_head = request_id_line(request_id)
        origin = headers.get("origin")
        is_cors_preflight = origin is not None and is_preflight(request.method, headers)
        if origin is not None and not is_cors_preflight:
            cycle.server_head += state.cors.response_head(origin)
        cycle.keep_alive = wants_keep_alive(event.http_version, headers.get("connection"))
        rejection = head_rejection(event, headers, num_header_bytes, config)
        if rejection is not None:
            self._reject(*rejection)
        elif state.is_draining:
            self._reject(503, "Server is shutting down")
        elif is_cors_preflight:
            cycle.handler = answer_preflight
        else:
            try:
                check_auth = state.check_auth
                if check_auth is not None and not state.router.is_public(path):
                    check_auth(headers.get("authorization"), headers.get("x-api-key"))
                cycle.handler, request.path_params = state.router.match(request.method, path)
            except HTTPError as exc:
                if self.conn.they_are_waiting_for_100_continue:
                    self._reject(exc.status, exc.message, exc.headers)
                else:  # answered once the body has been read (and dropped)
                    cycle.error = state.router.error_for(request.path, exc)

    def _on_body(self, data: bytes) -> None:
        cycle = self.cycle
        cycle.num_body_bytes += len(data)
        if cycle.num_body_bytes > self.config.max_body_bytes:
            self._reject(413, f"Request body too large (limit {self.config.max_body_bytes} bytes)")
            return
        if cycle.error is None:
            cycle.body_parts.append(data)
        self.deadline = self.loop.time() + self.config.body_timeout_s

    def _on_request_complete(self) -> None:
        self.deadline = None
        self.phase = BUSY
        cycle = self.cycle
        parts = cycle.body_parts
        if parts:
            cycle.request.body = parts[0] if len(parts) == 1 else b"".join(parts)
            cycle.body_parts = []
        if cycle.error is not None:
            outcome = send_error(cycle, self.transport, cycle.error, self.state.is_draining)
            # Then _process_events goes on with any pipelined bytes.
            self._end_cycle(outcome is Outcome.KEEP_ALIVE)
            return
        cycle.task = task = self.loop.create_task(self._respond(cycle))
        self.state.tasks.add(task)

    async def _respond(self, cycle: Cycle) -> None:
        """The task of one request: the exchange, then what its outcome asks of us."""
        try:
            outcome = await run_cycle(
                cycle,
                self.transport,
                self.flow,
                self._is_draining,
                self.conn.their_http_version >= b"1.1",
                self.config.sse_ping_interval_s,
            )
            if outcome is Outcome.KEEP_ALIVE or outcome is Outcome.CLOSE:
                self._end_cycle(outcome is Outcome.KEEP_ALIVE)
                self._process_events()  # the next pipelined request, if any
            elif outcome is Outcome.BROKEN:
                self._end_failed_stream(cycle)
            elif outcome is Outcome.ABORT:
                self.close_now()
            # Outcome.GONE: connection_lost already did everything.
        except Exception:
            request = cycle.request
            logger.exception("internal error answering %s %s", request.method, request.path)
            self.close_now()
        finally:
            self._log_access(cycle)
            self.state.tasks.discard(cycle.task)

    def _is_draining(self) -> bool:
        return self.state.is_draining

    def _end_cycle(self, reusable: bool) -> None:
        """The response is complete: close, or get ready for the next request."""
        cycle = self.cycle
        self.cycle = None
        if cycle is not None:
            self._log_access(cycle)
        if self.is_closed or self.phase == CLOSING:
            return
        if not reusable or self.state.is_draining:
            self._close()
            return
        # A fresh parser: h11 did not see complete responses (wire.py) and needs no reset.
        pipelined = self.conn.trailing_data[0]
        self.conn = new_parser(self.max_head_bytes)
        if pipelined:
            self.conn.receive_data(pipelined)
        self.phase = IDLE
        self.num_pipelined_bytes = 0
        if self.is_read_paused:
            self.is_read_paused = False
            self.transport.resume_reading()
        self.is_head_started = False
        self._set_deadline(self.config.timeout_keep_alive_s)

    def _log_access(self, cycle: Cycle) -> None:
        """One access-log line per request (once, however the request ended)."""
        if not cycle.is_logged:
            cycle.is_logged = True
            log_access(self.client, cycle)

    # ---- closing

    def _reject(self, status: int, message: str, headers: list[tuple[str, str]] = ()) -> None:
        """Answer a request we will not read further with an error, then close."""
        if self.is_closed or self.phase == CLOSING:
            return
        cycle = self.cycle
        # No cycle: the head was not parsed (too long, malformed), so no id or Origin was seen.
        if cycle is None:
            server_head, body = request_id_line(new_request_id()), None
        else:  # in the error format of the request's path
            error = HTTPError(status, message, headers=list(headers))
            server_head = cycle.server_head
            body = self.state.router.error_for(cycle.request.path, error).body()
        self.transport.write(raw_error_response(status, message, headers, server_head, body))
        self.cycle = None
        if cycle is not None:
            cycle.status = status
            self._log_access(cycle)
        self._linger_close()

    def _linger_close(self) -> None:
        self.phase = CLOSING
        self.deadline = None
        transport = self.transport
        if self.is_read_paused:
            self.is_read_paused = False
            transport.resume_reading()
        if transport.can_write_eof():
            transport.write_eof()
            self.linger_timer = self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    def _close(self) -> None:
        self.phase = CLOSING
        self.deadline = None
        if not self.is_closed:
            self.transport.close()

    def _end_failed_stream(self, cycle: Cycle) -> None:
        """A stream broke after its head went out: log it and close the connection."""
        self._log_access(cycle)
        if self.cycle is cycle:
            self.cycle = None
        self._close()

    def close_now(self) -> None:
        """Close at once (server shutdown); unsent buffered bytes are dropped."""
        if self.transport is None or self.is_closed:
            return
        self.phase = CLOSING
        self.deadline = None
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()
