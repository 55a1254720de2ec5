"""Real `python -m server serve` processes for the end-to-end tests.

One server with the default model is shared by every e2e test file (starting one costs
seconds of model loading on the CPU); a second, started only when a test asks for it,
requires an API key and has small limits (one sequence at a time, two queued requests,
1 MiB bodies) so 401, 429 and 413 are cheap to provoke.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
STARTUP_TIMEOUT_S = 180.0
SHUTDOWN_TIMEOUT_S = 60.0
API_KEY = "sk-e2e-test-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> {"name{labels}": value} for every sample line."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass
class ServerProcess:
    """A running `python -m server serve` child process and how to reach it."""

    proc: subprocess.Popen
    port: int
    log_path: Path
    api_key: str | None = None
    model: str = ""
    startup_health: list[tuple[int, bytes]] = field(default_factory=list)  # before ready

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def http(self, timeout_s: float = 60.0) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=timeout_s)

    def _client_options(self, overrides: dict) -> dict:
        options = {
            "base_url": f"{self.base_url}/v1",
            "api_key": self.api_key or "unused",
            "max_retries": 0,  # a retried 429 or 5xx would hide what the server answered
            "timeout": 60.0,
        }
        return {**options, **overrides}

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(**self._client_options(kwargs))

    def async_openai(self, **kwargs) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(**self._client_options(kwargs))

    def connect(self, timeout_s: float = 30.0) -> socket.socket:
        """A raw TCP connection (close it yourself, e.g. with `with`)."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout_s)

    def metrics(self) -> dict[str, float]:
        r = httpx.get(f"{self.base_url}/metrics", timeout=10)
        assert r.status_code == 200, r.text
        return parse_metrics(r.text)

    def wait_idle(self, timeout_s: float = 5.0) -> tuple[float, dict[str, float]]:
        """Polls /metrics until no request runs, waits, or holds KV blocks.

        Returns (seconds it took, the last metrics); fails the test on timeout."""
        start = time.monotonic()
        while True:
            m = self.metrics()
            idle = (
                m["nanoserve_num_requests_running"] == 0
                and m["nanoserve_num_requests_waiting"] == 0
                and m["nanoserve_kv_cache_usage_ratio"] == 0
            )
            elapsed = time.monotonic() - start
            if idle:
                return elapsed, m
            assert elapsed < timeout_s, f"server not idle after {timeout_s} s: {m}"
            time.sleep(0.05)

    def stop(self) -> int:
        """SIGTERM, then the exit code (the process is killed if it hangs)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(SHUTDOWN_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def serve_command(model_dir: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "server", "serve", str(model_dir), "--port", str(port), *args]


def start_server(
    model_dir: Path, log_path: Path, *args: str, api_key: str | None = None
) -> ServerProcess:
    """Starts a server and returns once /health answers 200."""
    port = free_port()
    cmd = serve_command(model_dir, port, *args)
    if api_key:
        cmd += ["--api-key", api_key]
    env = {k: v for k, v in os.environ.items() if k != "NANOSERVE_API_KEY"}
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log_path, api_key, model=Path(model_dir).resolve().name)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with httpx.Client(timeout=5) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{server.log()[-4000:]}")
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"server not ready in {STARTUP_TIMEOUT_S} s:\n{server.log()[-4000:]}")
            try:
                r = client.get(f"{server.base_url}/health")
            except httpx.TransportError:
                time.sleep(0.1)
                continue
            if r.status_code == 200:
                return server
            server.startup_health.append((r.status_code, r.content))
            time.sleep(0.1)


def stop_and_check(server: ServerProcess) -> None:
    """SIGTERM must drain and exit 0, with no error or traceback anywhere in the log."""
    code = server.stop()
    log = server.log()
    assert code == 0, f"server exited with {code} after SIGTERM:\n{log[-4000:]}"
    assert "Traceback" not in log, log[-8000:]
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert not errors, "\n".join(errors[:20])


@pytest.fixture(scope="session")
def server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """The default model behind a real server process, shared by every e2e test."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    srv = start_server(
        default_model_dir, log_path, "--max-model-len", "2048", "--kv-cache-memory", "512MiB"
    )
    try:
        yield srv
    finally:
        stop_and_check(srv)


@pytest.fixture(scope="session")
def strict_server(
    default_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A server that needs an API key, runs one sequence at a time, queues at most two
    requests, takes bodies up to 1 MiB and n up to 2."""
    log_path = tmp_path_factory.mktemp("strict_server") / "server.log"
    srv = start_server(
        default_model_dir,
        log_path,
        "--max-model-len", "1024",
        "--kv-cache-memory", "64MiB",
        "--max-num-seqs", "1",
        "--max-queued-requests", "2",
        "--max-body-bytes", "1MiB",
        "--max-n", "2",
        api_key=API_KEY,
    )  # fmt: skip
    try:
        yield srv
    finally:
        stop_and_check(srv)


@pytest.fixture
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with server.openai() as c:
        yield c


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with server.http() as c:
        yield c
