"""`nanoserve serve file.gguf`: the default model's own Q4_1 file, served as it is, runs its
4-bit weights (int4 group 32), names the model after the file and answers like the same
weights quantized from the converted folder."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from model.hub.default_model import ensure_default_gguf
from tests.e2e.conftest import start_server, stop_and_check

ARGS = ("--max-model-len", "1024", "--kv-cache-memory", "64MiB")
QUESTIONS = ["What is the capital of France?", "Name three colours."]


def greedy_answers(base_url: str) -> list[str]:
    answers = []
    with httpx.Client(base_url=base_url, timeout=120) as http:
        for question in QUESTIONS:
            body = {"messages": [{"role": "user", "content": question}], "max_tokens": 16}
            r = http.post("/v1/chat/completions", json={**body, "temperature": 0})
            assert r.status_code == 200, r.text
            answers.append(r.json()["choices"][0]["message"]["content"])
    return answers


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return ensure_default_gguf(progress=False)


def test_a_gguf_is_served_with_its_own_4_bit_weights(
    gguf_path: Path, default_model_dir: Path, tmp_path: Path
) -> None:
    srv = start_server(gguf_path, tmp_path / "gguf.log", *ARGS)
    try:
        log = srv.log()
        assert "int4 weights (g32)" in log, log[-2000:]
        model_id = httpx.get(srv.base_url + "/v1/models").json()["data"][0]["id"]
        assert model_id == gguf_path.stem
        from_gguf = greedy_answers(srv.base_url)
    finally:
        stop_and_check(srv)
    folder = start_server(
        default_model_dir, tmp_path / "folder.log", *ARGS, "--quantization", "int4"
    )
    try:
        assert greedy_answers(folder.base_url) == from_gguf
    finally:
        stop_and_check(folder)
    assert all(answer.strip() for answer in from_gguf)


def test_quantization_none_keeps_a_gguf_in_float(gguf_path: Path, tmp_path: Path) -> None:
    srv = start_server(gguf_path, tmp_path / "gguf.log", *ARGS, "--quantization", "none")
    try:
        assert "int4 weights" not in srv.log() and "oneDNN-packed" in srv.log()
    finally:
        stop_and_check(srv)
