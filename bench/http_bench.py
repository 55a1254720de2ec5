"""HTTP core benchmark: nanoserve's server vs the same endpoints in FastAPI + uvicorn.

    python -m bench.http_bench [--duration 5] [--repeat 3] [--connections 32] [--streams 256]
                               [--events 200] [--no-pin]

Both servers (uvloop, access log off) run in subprocesses, one after the other and
interleaved over --repeat rounds, pinned to one CPU while this process (the load client:
raw asyncio sockets, uvloop) is pinned to another (--no-pin to let the OS place them).
  (a) GET /v1/models requests/s over N keep-alive connections, one request in flight each.
  (b) SSE events/s delivered to M concurrent streams; each stream is GET /v1/stream, a fake
      token source yielding --events chunk events (one per event-loop tick) then [DONE];
      a finished stream's connection immediately asks for the next stream.
Each figure follows a 1 s warm-up. Besides throughput it reports the server's CPU time
per request / event (from /proc), which is steadier than throughput on a shared machine.
The clients check every response (status 200, events per stream), so a server that
answers differently cannot win.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, load_average, stop_process, wait_ready

MODELS = {
    "object": "list",
    "data": [
        {
            "id": "SmolLM2-135M-Instruct",
            "object": "model",
            "created": 1700000000,
            "owned_by": "nanoserve",
        }
    ],
}


def token_chunk(i: int) -> dict:
    return {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "SmolLM2-135M-Instruct",
        "choices": [{"index": 0, "delta": {"content": f" tok{i}"}, "finish_reason": None}],
    }


def _payloads(num_events: int) -> list[str]:
    import orjson

    return [orjson.dumps(token_chunk(i)).decode() for i in range(num_events)]


_PAYLOADS: dict[int, list[str]] = {}


async def fake_tokens(num_events: int):
    """The fake engine: one ready-made chunk per event-loop tick (as an engine delivers
    tokens), then [DONE]. Payloads are pre-serialised so the figures measure the HTTP layer."""
    payloads = _PAYLOADS.get(num_events)
    if payloads is None:
        payloads = _PAYLOADS[num_events] = _payloads(num_events)
    for payload in payloads:
        await asyncio.sleep(0)
        yield payload
    yield "[DONE]"


# ---- servers (each runs in its own subprocess)


def serve_ours(port: int) -> None:
    from server.http.config import ServerConfig
    from server.http.messages import JSONResponse
    from server.http.routing import Router
    from server.http.server import run_server
    from server.http.sse import EventSourceResponse

    router = Router()

    async def models(request):
        return JSONResponse(MODELS)

    async def stream(request):
        return EventSourceResponse(fake_tokens(int(request.query.get("n", "200"))))

    router.add("GET", "/v1/models", models)
    router.add("GET", "/v1/stream", stream)
    sys.exit(run_server(router, ServerConfig(port=port, max_connections=4096)))


def serve_fastapi(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from sse_starlette import EventSourceResponse

    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return MODELS

    @app.get("/v1/stream")
    async def stream(n: int = 200):
        return EventSourceResponse(fake_tokens(n))

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# ---- load client


class KeepAliveClient(asyncio.Protocol):
    """Sends `request` again as soon as the previous Content-Length response is complete.

    counter = [responses, bad responses (not a 200)].
    """

    def __init__(self, request: bytes, counter: list[int]) -> None:
        self.request = request
        self.counter = counter
        self.buffer = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        buf = self.buffer + data
        while (head_end := buf.find(b"\r\n\r\n")) >= 0:
            at = buf.find(b"content-length: ", 0, head_end)  # both servers send lower case
            length = int(buf[at + 16 : buf.find(b"\r\n", at)]) if at >= 0 else 0
            end = head_end + 4 + length
            if len(buf) < end:
                break
            if not buf.startswith(b"HTTP/1.1 200 "):
                self.counter[1] += 1
            buf = buf[end:]
            self.counter[0] += 1
            self.transport.write(self.request)
        self.buffer = buf


class StreamClient(asyncio.Protocol):
    """Reads chunked SSE responses, counting `data: ` events, and starts the next stream.

    counter = [events, streams with the wrong number of events].
    """

    _END = b"\r\n0\r\n\r\n"

    def __init__(self, request: bytes, counter: list[int], events_per_stream: int) -> None:
        self.request = request
        self.counter = counter
        self.events_per_stream = events_per_stream
        self.num_events = 0
        self.tail = b""
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        # The 7-byte tail is shorter than "data: " and the end marker, so nothing counts twice.
        view = self.tail + data
        num_events = view.count(b"data: ")
        self.counter[0] += num_events
        self.num_events += num_events
        if view.endswith(self._END):
            if self.num_events != self.events_per_stream:
                self.counter[1] += 1
            self.num_events = 0
            self.tail = b""
            self.transport.write(self.request)
        else:
            self.tail = view[-7:]


def cpu_seconds(pid: int) -> float:
    """user + system CPU time of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    factory, num_connections: int, port: int, duration_s: float, server_pid: int
) -> tuple[float, float]:
    """(operations/s, server CPU microseconds per operation) over duration_s."""
    loop = asyncio.get_running_loop()
    counter = [0, 0]
    transports = []
    for _ in range(num_connections):
        transport, _ = await loop.create_connection(lambda: factory(counter), "127.0.0.1", port)
        transports.append(transport)
    await asyncio.sleep(1.0)  # warm-up
    start_count, start, start_cpu = counter[0], time.perf_counter(), cpu_seconds(server_pid)
    await asyncio.sleep(duration_s)
    num_ops = counter[0] - start_count
    rate = num_ops / (time.perf_counter() - start)
    cpu_us = (cpu_seconds(server_pid) - start_cpu) * 1e6 / max(num_ops, 1)
    for transport in transports:
        transport.abort()
    await asyncio.sleep(0.2)
    if counter[1]:
        raise RuntimeError(f"{counter[1]} wrong responses: the servers are not equivalent")
    return rate, cpu_us


def run_one(kind: str, args: argparse.Namespace) -> dict[str, tuple[float, float]]:
    import uvloop

    port = free_port()
    cmd = [sys.executable, "-m", "bench.http_bench", "--serve", kind, "--port", str(port)]
    if args.server_cpu is not None:
        cmd += ["--cpu", str(args.server_cpu)]
    proc = subprocess.Popen(cmd)
    try:
        wait_ready(f"http://127.0.0.1:{port}", proc, "/v1/models", timeout_s=30)
        models_request = b"GET /v1/models HTTP/1.1\r\nHost: bench\r\n\r\n"
        stream_request = b"GET /v1/stream?n=%d HTTP/1.1\r\nHost: bench\r\n\r\n" % args.events
        rps, rps_cpu = uvloop.run(
            measure(
                lambda c: KeepAliveClient(models_request, c),
                args.connections,
                port,
                args.duration,
                proc.pid,
            )
        )
        print(
            f"  {kind:8s} (a) GET /v1/models: {rps:9.0f} req/s     "
            f"server CPU {rps_cpu:6.1f} us/request",
            flush=True,
        )
        eps, eps_cpu = uvloop.run(
            measure(
                lambda c: StreamClient(stream_request, c, args.events + 1),
                args.streams,
                port,
                args.duration,
                proc.pid,
            )
        )
        print(
            f"  {kind:8s} (b) SSE events:     {eps:9.0f} events/s  "
            f"server CPU {eps_cpu:6.1f} us/event",
            flush=True,
        )
        return {"a": (rps, rps_cpu), "b": (eps, eps_cpu)}
    finally:
        stop_process(proc, timeout_s=10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--streams", type=int, default=256)
    parser.add_argument("--events", type=int, default=200, help="events per stream")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds")
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin server and client to separate CPUs"
    )
    parser.add_argument("--serve", choices=["ours", "fastapi"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        (serve_ours if args.serve == "ours" else serve_fastapi)(args.port)
        return

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    args.server_cpu = None
    if len(cpus) >= 2 and not args.no_pin:
        args.server_cpu = cpus[0]
        os.sched_setaffinity(0, {cpus[1]})
        print(f"server pinned to CPU {cpus[0]}, load client to CPU {cpus[1]}")
    print(
        f"(a) {args.connections} keep-alive connections, (b) {args.streams} streams x "
        f"{args.events} events; {args.duration:.0f} s each after a 1 s warm-up"
    )
    runs: dict[str, list[dict]] = {"ours": [], "fastapi": []}
    for i in range(args.repeat):
        print(f"round {i + 1}/{args.repeat}")
        for kind in ("ours", "fastapi"):  # interleaved, so background load hits both alike
            runs[kind].append(run_one(kind, args))
    print(
        f"best of {args.repeat} rounds (throughput) / median (server CPU per operation); "
        f"load {load_average()}:"
    )
    for test, unit, target in (("a", "req/s", 2), ("b", "events/s", 3)):
        best = {k: max(r[test][0] for r in v) for k, v in runs.items()}
        cpu = {k: statistics.median(r[test][1] for r in v) for k, v in runs.items()}
        print(
            f"  ({test}) ours {best['ours']:9.0f} {unit:8s} fastapi {best['fastapi']:9.0f} {unit:8s}"
            f"  ratio {best['ours'] / best['fastapi']:5.2f}x (target >= {target}x);"
            f"  CPU/op ratio fastapi/ours {cpu['fastapi'] / cpu['ours']:5.2f}x"
        )


if __name__ == "__main__":
    main()
