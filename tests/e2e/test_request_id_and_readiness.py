"""x-request-id, CORS and Retry-After against real server processes, with the openai SDK."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
import openai

from tests.e2e.conftest import REPO_ROOT, ServerProcess, free_port, serve_command

HI = [{"role": "user", "content": "Say hi."}]


def test_sdk_sees_the_request_id_it_sent(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model=client.models.list().data[0].id,
        messages=HI,
        max_tokens=3,
        extra_headers={"X-Request-Id": "e2e-trace-42"},
    )
    assert raw.headers["x-request-id"] == "e2e-trace-42"
    completion = raw.parse()
    assert completion._request_id == "e2e-trace-42"
    assert completion.id.startswith("chatcmpl-e2e-trace-42-")

    made = client.chat.completions.create(
        model=completion.model, messages=HI, max_tokens=3
    )  # no header: the server makes one, and the id derives from it
    assert made._request_id and made.id == f"chatcmpl-{made._request_id}"


def test_cors_preflight_and_headers(server: ServerProcess) -> None:
    origin = {"Origin": "https://ui.example"}
    with server.http() as http:
        r = http.options(
            "/v1/chat/completions",
            headers={**origin, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "authorization, content-type"},
        )  # fmt: skip
        assert r.status_code == 204
        assert r.headers["access-control-allow-origin"] == "*"
        assert r.headers["access-control-allow-headers"] == "authorization, content-type"
        with http.stream(
            "POST",
            "/v1/chat/completions",
            headers=origin,
            json={"messages": HI, "max_tokens": 2, "stream": True},
        ) as stream:
            assert stream.status_code == 200
            assert stream.headers["access-control-allow-origin"] == "*"
            assert "x-request-id" in stream.headers["access-control-expose-headers"]
            stream.read()


def test_sdk_retries_a_loading_server_thanks_to_retry_after(
    default_model_dir: Path, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "server.log"
    cmd = serve_command(
        default_model_dir, port, "--max-model-len", "256", "--kv-cache-memory", "32MiB"
    )
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = ServerProcess(proc, port, log_path, model=default_model_dir.resolve().name)
    try:
        deadline = time.monotonic() + 60
        while True:  # the socket is bound before the model loads: wait for the first 503
            assert proc.poll() is None, server.log()[-4000:]
            assert time.monotonic() < deadline, server.log()[-4000:]
            try:
                r = httpx.get(f"{server.base_url}/v1/models", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
        # Retry-After: 1 s per try, so 60 tries give the model a minute to load.
        with server.openai(max_retries=60) as sdk:
            raw = sdk.chat.completions.with_raw_response.create(
                model=server.model, messages=HI, max_tokens=3
            )
            # The load usually outlasts the first try (retries_taken >= 1), but it may not.
            assert raw.parse().choices[0].message.content is not None
    finally:
        assert server.stop() == 0, server.log()[-4000:]
