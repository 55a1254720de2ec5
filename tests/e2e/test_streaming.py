"""Server-sent events as real clients see them: curl, httpx, many concurrent SDK streams."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import pytest

from tests.e2e.conftest import ServerProcess

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def sse_events(lines: list[str]) -> list[str]:
    """The `data:` payloads of an event stream, checking the framing on the way:
    every event is one `data: ` line followed by a blank line (pings are comments)."""
    events = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(":"):  # a comment (": ping") and its blank line
            assert lines[i + 1] == "", lines[i : i + 2]
            i += 2
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        assert i + 1 < len(lines) and lines[i + 1] == "", (
            f"event not ended by a blank line: {line!r}"
        )
        events.append(line.removeprefix("data: "))
        i += 2
    return events


def stream_text(server: ServerProcess, path: str, body: dict) -> tuple[str, list[dict]]:
    """POSTs a streaming request; returns the text and the parsed chunks (not [DONE])."""
    with (
        server.http() as http,
        http.stream("POST", path, json={**body, "stream": True}) as r,
    ):
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    if path.endswith("/chat/completions"):
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    else:
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    return text, chunks


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_curl_sees_events_one_by_one(server: ServerProcess) -> None:
    body = {"messages": FRANCE, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    cmd = [
        "curl", "-sS", "-N", "-i", f"{server.base_url}/v1/chat/completions",
        "-H", "Content-Type: application/json", "-d", json.dumps({**body, "stream": True}),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []
    with proc:
        for raw in proc.stdout:
            lines.append((time.monotonic(), raw.decode().rstrip("\r\n")))
        assert proc.wait(60) == 0, proc.stderr.read()
    blank = next(i for i, (_, line) in enumerate(lines) if line == "")
    status, *headers = [line for _, line in lines[:blank]]
    assert status.startswith("HTTP/1.1 200")
    headers = {h.split(":", 1)[0].lower(): h.split(":", 1)[1].strip() for h in headers}
    assert headers["content-type"].startswith("text/event-stream")
    assert headers["cache-control"] == "no-cache"
    assert headers["transfer-encoding"] == "chunked"
    body_lines = lines[blank + 1 :]
    events = sse_events([line for _, line in body_lines])
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    # 24 tokens decoded one step at a time: the events reach curl at many distinct moments
    arrivals = [t for t, line in body_lines if line.startswith("data: ")]
    distinct = {round(t, 3) for t in arrivals}
    assert len(distinct) >= 8, f"events arrived in {len(distinct)} bursts"
    assert arrivals[-1] - arrivals[1] > 0.1


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_streamed_text_equals_non_streamed(server: ServerProcess, http: httpx.Client, path) -> None:
    if path == "/v1/chat/completions":
        body = {"messages": [{"role": "user", "content": "Tell me a short story."}]}
    else:
        body = {"prompt": "Once upon a time"}
    body |= {"max_tokens": 32, "temperature": 0}
    r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    whole = choice["message"]["content"] if "message" in choice else choice["text"]
    streamed, chunks = stream_text(server, path, body)
    assert streamed == whole
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == choice["finish_reason"] and not any(finish[:-1])
    assert "usage" not in chunks[0]  # without include_usage there is no usage field at all


def test_stream_include_usage(server: ServerProcess) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    _, chunks = stream_text(
        server, "/v1/completions", body | {"stream_options": {"include_usage": True}}
    )
    *others, last = chunks
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 8
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 8
    assert all("usage" in c and c["usage"] is None for c in others)


def test_32_concurrent_streams_match_a_lone_request(server: ServerProcess) -> None:
    prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "Write a haiku about the sea.",
        "What is 2 + 2?",
    ]

    def messages(i: int) -> list[dict]:
        return [{"role": "user", "content": prompts[i % len(prompts)]}]

    async def one(client, i: int) -> str:
        stream = await client.chat.completions.create(
            model=server.model,
            messages=messages(i),
            max_tokens=16,
            temperature=0,
            stream=True,
        )
        async with stream:
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    async def main() -> tuple[list[str], list[str]]:
        async with server.async_openai() as client:
            alone = [await one(client, i) for i in range(len(prompts))]
            together = await asyncio.gather(*(one(client, i) for i in range(32)))
        return alone, together

    alone, together = asyncio.run(main())
    assert all(alone)
    for i, text in enumerate(together):
        assert text == alone[i % len(prompts)], f"stream {i} differs"
    server.wait_idle()


def test_a_slow_reader_loses_nothing(server: ServerProcess, http: httpx.Client) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 24, "temperature": 0, "ignore_eos": True}
    whole = http.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with (
        server.http() as client,
        client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r,
    ):
        lines = r.iter_lines()
        first = next(lines)
        time.sleep(2.0)  # the server generates the rest meanwhile
        events = sse_events([first, *lines])
    assert events[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
    assert text == whole
