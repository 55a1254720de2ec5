"""A client that goes away at any moment aborts its request: the batch empties, the KV blocks
are freed, and nothing keeps generating for nobody.

Every request here asks for hundreds of tokens with ignore_eos (tens of seconds of CPU
decoding); the server must be idle again a few seconds after the disconnect.
"""

from __future__ import annotations

import json
import random
import socket
import time
import uuid

import pytest

from tests.e2e.conftest import API_KEY, ServerProcess

ABORTED = 'nanoserve_requests_total{finish_reason="abort"}'
GENERATED = "nanoserve_generation_tokens_total"
IDLE_TIMEOUT_S = 8.0
MAX_TOKENS = 600  # about a minute of decoding on two CPU cores
WORDS = [
    "apple",
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
]


def unique_text(num_words: int) -> str:
    """Text no earlier request started with, so the prefix cache cannot shorten its prefill."""
    rng = random.Random(uuid.uuid4().int)
    return f"{uuid.uuid4().hex} " + " ".join(rng.choice(WORDS) for _ in range(num_words))


def request_bytes(body: dict, api_key: str | None = None) -> bytes:
    payload = json.dumps(body).encode()
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {len(payload)}",
    ]
    if api_key:
        head.append(f"Authorization: Bearer {api_key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


def chat_body(server: ServerProcess, stream: bool, num_words: int = 20) -> dict:
    return {
        "model": server.model,
        "messages": [{"role": "user", "content": unique_text(num_words)}],
        "max_tokens": MAX_TOKENS,
        "ignore_eos": True,
        "temperature": 0,
        "stream": stream,
    }


def read_until(sock: socket.socket, done, timeout_s: float = 60.0) -> bytes:
    """Reads from `sock` until done(received) is true."""
    received = b""
    deadline = time.monotonic() + timeout_s
    while not done(received):
        assert time.monotonic() < deadline, f"timed out; got {received[-500:]!r}"
        data = sock.recv(65536)
        assert data, f"server closed the connection; got {received[-500:]!r}"
        received += data
    return received


def num_content_events(received: bytes) -> int:
    return received.count(b'"delta":{"content":')


def wait_for(server: ServerProcess, predicate, timeout_s: float = 60.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout_s
    while True:
        m = server.metrics()
        if predicate(m):
            return m
        assert time.monotonic() < deadline, f"condition not met: {m}"
        time.sleep(0.02)


def check_aborted(server: ServerProcess, before: dict[str, float], num_aborted: int = 1) -> None:
    """The server is idle within seconds and the request ended as aborted, short of its tokens."""
    elapsed_s, after = server.wait_idle(IDLE_TIMEOUT_S)
    assert after[ABORTED] - before[ABORTED] == num_aborted, (before, after)
    assert after[GENERATED] - before[GENERATED] < MAX_TOKENS * num_aborted / 2
    # and it still serves
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
        assert r.status_code == 200, r.text


@pytest.fixture
def before(server: ServerProcess) -> dict[str, float]:
    return server.wait_idle(30)[1]


def test_disconnect_right_after_sending(server: ServerProcess, before) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(chat_body(server, stream=True)))
    check_aborted(server, before)


def test_disconnect_before_the_first_token(server: ServerProcess, before) -> None:
    # A long prompt: prefill takes a few steps, and the role chunk comes before any token.
    with server.connect() as sock:
        sock.sendall(request_bytes(chat_body(server, stream=True, num_words=1000)))
        received = read_until(sock, lambda b: b'"role":"assistant"' in b)
        assert num_content_events(received) == 0
    check_aborted(server, before)


def test_disconnect_mid_stream(server: ServerProcess, before) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(chat_body(server, stream=True)))
        read_until(sock, lambda b: num_content_events(b) >= 3)
    check_aborted(server, before)


def test_disconnect_during_a_non_streaming_request(server: ServerProcess, before) -> None:
    with server.connect() as sock:
        sock.sendall(request_bytes(chat_body(server, stream=False)))
        wait_for(server, lambda m: m[GENERATED] - before[GENERATED] >= 3)
    check_aborted(server, before)


def test_disconnect_with_n_choices(server: ServerProcess, before) -> None:
    body = chat_body(server, stream=True) | {"n": 3, "temperature": 1.0, "seed": 1}
    with server.connect() as sock:
        sock.sendall(request_bytes(body))
        read_until(sock, lambda b: num_content_events(b) >= 3)
    check_aborted(server, before, num_aborted=3)


def test_disconnect_while_waiting_in_the_queue(strict_server: ServerProcess) -> None:
    """The strict server runs one sequence at a time: the second request waits, then leaves."""
    before = strict_server.wait_idle(30)[1]
    body = chat_body(strict_server, stream=True)
    with strict_server.connect() as running:
        running.sendall(request_bytes(body, API_KEY))
        read_until(running, lambda b: num_content_events(b) >= 1)
        with strict_server.connect() as waiting:
            waiting.sendall(request_bytes(chat_body(strict_server, stream=True), API_KEY))
            wait_for(strict_server, lambda m: m["nanoserve_num_requests_waiting"] == 1)
        m = wait_for(strict_server, lambda m: m["nanoserve_num_requests_waiting"] == 0, 5)
        assert m["nanoserve_num_requests_running"] == 1
    elapsed_s, after = strict_server.wait_idle(IDLE_TIMEOUT_S)
    assert after[ABORTED] - before[ABORTED] == 2
