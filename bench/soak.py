"""Soak: minutes of constant mixed load, sampling the server's resident memory and throughput.

    python bench/soak.py --minutes 30                 # starts nanoserve on a free port
    python bench/soak.py --url http://127.0.0.1:8000 --pid 1234 --minutes 10

--workers clients loop until the time is up, each request drawn at random: chat or completion,
streaming or not, and one in five cut early (a stream closed after a few events, a request
closed before its answer, sometimes with a TCP reset). Every --sample-s seconds it prints the
server's RSS (/proc/PID/status), requests finished and output tok/s over the interval; at the
end, RSS growth from minute 2 (after warm-up: allocator pools, caches) to the end, and whether
the server is idle again (nothing running, waiting or holding KV blocks).
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, free_port, http_get, load_average, stop_process, wait_ready

WORDS = [
    "river",
    "stone",
    "cloud",
    "green",
    "quick",
    "table",
    "music",
    "window",
    "paper",
    "light",
    "orange",
    "garden",
    "bridge",
    "island",
    "forest",
    "summer",
    "winter",
    "bread",
    "coffee",
    "engine",
    "signal",
    "planet",
    "ocean",
    "valley",
    "castle",
]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def metrics(url: str) -> dict[str, float]:
    status, body = http_get(f"{url}/metrics", timeout_s=10)
    assert status == 200, status
    samples = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def request_bytes(host: str, path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + payload


class Load:
    def __init__(self, url: str, seed: int) -> None:
        parts = urlsplit(url)
        self.address = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.host = parts.netloc
        self.seed = seed
        self.lock = threading.Lock()
        self.num_done = 0
        self.num_cut = 0
        self.num_failed = 0
        self.failures: list[str] = []
        self.stop_at = 0.0

    def one(self, rng: random.Random) -> None:
        is_chat = rng.random() < 0.6
        stream = rng.random() < 0.6
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 80)))
        body: dict = {"max_tokens": rng.randint(4, 96), "stream": stream}
        body["temperature"] = rng.choice([0, 0.7, 1.0])
        if is_chat:
            path = "/v1/chat/completions"
            body["messages"] = [{"role": "user", "content": text}]
        else:
            path = "/v1/completions"
            body["prompt"] = text
        is_cut = rng.random() < 0.2
        with socket.create_connection(self.address, timeout=120) as sock:
            if is_cut and rng.random() < 0.5:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.sendall(request_bytes(self.host, path, body))
            received = b""
            wanted_events = rng.randint(1, 4) if is_cut else None
            if is_cut and not stream:
                time.sleep(rng.uniform(0, 0.2))
            else:
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    received += chunk
                    if wanted_events is not None and received.count(b"\n\n") > wanted_events:
                        break
        with self.lock:
            if is_cut:
                self.num_cut += 1
            elif received.startswith(b"HTTP/1.1 200"):
                self.num_done += 1
            else:
                self.num_failed += 1
                if len(self.failures) < 5:
                    self.failures.append(received[:200].decode(errors="replace"))

    def worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        while time.monotonic() < self.stop_at:
            try:
                self.one(rng)
            except OSError as exc:
                with self.lock:
                    self.num_failed += 1
                    if len(self.failures) < 5:
                        self.failures.append(repr(exc))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start nanoserve)")
    parser.add_argument("--pid", type=int, help="the server's pid, with --url")
    parser.add_argument("--model-dir", help="model for the launched server (default model)")
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.url and not args.pid:
        parser.error("--url needs --pid (to read the server's memory)")

    proc = None
    url, pid = args.url, args.pid
    if url is None:
        port = free_port()
        cmd = [sys.executable, "-m", "server", "serve", "--port", str(port)]
        cmd += [args.model_dir] if args.model_dir else []
        cmd += ["--log-level", "warning"]
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL)
        url, pid = f"http://127.0.0.1:{port}", proc.pid
        wait_ready(url, proc, "/health", timeout_s=300)
    try:
        return soak(url, pid, args)
    finally:
        if proc is not None:
            stop_process(proc, timeout_s=30)


def soak(url: str, pid: int, args: argparse.Namespace) -> int:
    load = Load(url, args.seed)
    start = time.monotonic()
    load.stop_at = start + args.minutes * 60
    threads = [
        threading.Thread(target=load.worker, args=(i,), daemon=True) for i in range(args.workers)
    ]
    for thread in threads:
        thread.start()
    print(f"soak: {args.minutes:g} min, {args.workers} workers against {url} (pid {pid})")
    print(f"{'t(s)':>6} {'RSS MiB':>9} {'done':>6} {'cut':>5} {'failed':>6} {'tok/s':>7}  load")
    samples: list[tuple[float, float]] = []
    last_tokens = metrics(url).get("nanoserve_generation_tokens_total", 0.0)
    last_t = start
    while time.monotonic() < load.stop_at:
        time.sleep(min(args.sample_s, max(0.0, load.stop_at - time.monotonic())))
        now = time.monotonic()
        tokens = metrics(url).get("nanoserve_generation_tokens_total", 0.0)
        rss = rss_mib(pid)
        samples.append((now - start, rss))
        tok_s = (tokens - last_tokens) / max(now - last_t, 1e-9)
        last_tokens, last_t = tokens, now
        print(
            f"{now - start:6.0f} {rss:9.1f} {load.num_done:6d} {load.num_cut:5d} "
            f"{load.num_failed:6d} {tok_s:7.1f}  {load_average()}",
            flush=True,
        )
    for thread in threads:
        thread.join(180)
    deadline = time.monotonic() + 30
    m = metrics(url)
    while time.monotonic() < deadline:
        m = metrics(url)
        busy = (
            m["nanoserve_num_requests_running"]
            + m["nanoserve_num_requests_waiting"]
            + m["nanoserve_kv_cache_usage_ratio"]
        )
        if busy == 0:
            break
        time.sleep(0.1)
    idle = (
        m["nanoserve_num_requests_running"] == 0
        and m["nanoserve_num_requests_waiting"] == 0
        and m["nanoserve_kv_cache_usage_ratio"] == 0
    )
    after_warmup = [rss for t, rss in samples if t >= 120] or [rss for _, rss in samples]
    growth = (after_warmup[-1] - after_warmup[0]) / after_warmup[0] * 100
    print(f"requests: {load.num_done} answered, {load.num_cut} cut early, {load.num_failed} failed")
    for failure in load.failures:
        print(f"  failure: {failure!r}")
    print(
        f"RSS from minute 2 to the end: {after_warmup[0]:.1f} -> {after_warmup[-1]:.1f} MiB "
        f"({growth:+.2f}%), peak {max(r for _, r in samples):.1f} MiB"
    )
    print(
        f"idle afterwards: {'yes' if idle else 'no'} ({m})" if not idle else "idle afterwards: yes"
    )
    return 0 if idle and load.num_failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
