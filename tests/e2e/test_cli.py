"""`python -m server ...` as a user runs it: answers, and one clear line on bad input."""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import REPO_ROOT, ServerProcess, start_server

MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def nanoserve(*args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "NANOSERVE_API_KEY"}
    return subprocess.run(
        [sys.executable, "-m", "server", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def check_one_line_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nanoserve: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_generate_answers(default_model_dir: Path) -> None:
    result = nanoserve(
        "generate", "--model", str(default_model_dir), "--max-tokens", "16",
        "What is the capital of France?",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "Traceback" not in result.stderr


def test_generate_runs_a_gguf_file_on_its_own_4_bit_weights() -> None:
    """`--quantization auto` settles as for serve: a GGUF file runs int4 (its Q4_1 blocks); an
    explicit choice stands, and a bad one is argparse's usage error."""
    from model.hub.default_model import ensure_default_gguf
    from server.cli import build_parser, resolve_model_dir, settle_quantization

    gguf = str(ensure_default_gguf(progress=False))
    for flags, want in (([], "int4"), (["--quantization", "none"], "none")):
        args = build_parser().parse_args(["generate", "--model", gguf, *flags, "hi"])
        settle_quantization(args, args.model, resolve_model_dir(args.model))
        assert getattr(args, "EngineConfig.quantization") == want, flags
    result = nanoserve(
        "generate", "--model", gguf, "--max-tokens", "16", "Name three primary colors."
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Red" in result.stdout, result.stdout
    bad = nanoserve("generate", "--quantization", "int3", "hi")
    assert bad.returncode == 2 and "invalid choice: 'int3'" in bad.stderr, bad.stderr


def test_help_lists_every_command_and_serve_flag() -> None:
    result = nanoserve("--help")
    assert result.returncode == 0
    for command in ("serve", "pull", "convert-gguf", "generate"):
        assert command in result.stdout
    result = nanoserve("serve", "--help")
    assert result.returncode == 0
    flags = (
        "--host --port --served-model-name --api-key --max-model-len --max-num-seqs "
        "--max-num-batched-tokens --kv-cache-memory --gpu-memory-utilization --device --dtype "
        "--max-queued-requests --header-timeout --timeout-keep-alive --shutdown-timeout "
        "--log-level"
    )
    for flag in flags.split():
        assert flag in result.stdout


def test_serve_missing_folder() -> None:
    check_one_line_error(nanoserve("serve", "/nonexistent"), 2, "/nonexistent", "config.json")


def test_serve_broken_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    check_one_line_error(nanoserve("serve", str(tmp_path)), 2, "config.json")


def test_serve_unknown_architecture(tmp_path: Path) -> None:
    config = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 100}
    (tmp_path / "config.json").write_text(json.dumps(config))
    check_one_line_error(nanoserve("serve", str(tmp_path)), 2, "GPT2LMHeadModel")


def test_serve_missing_tokenizer(tmp_path: Path, default_model_dir: Path) -> None:
    (tmp_path / "config.json").write_bytes((default_model_dir / "config.json").read_bytes())
    check_one_line_error(nanoserve("serve", str(tmp_path)), 2, "tokenizer.json")


def test_serve_missing_weights(tmp_path: Path, default_model_dir: Path) -> None:
    """The folder passes the quick checks; loading fails after the socket is bound."""
    for name in MODEL_FILES:
        (tmp_path / name).symlink_to(default_model_dir / name)
    result = nanoserve("serve", str(tmp_path), "--port", "0")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("nanoserve: error:")]
    assert len(errors) == 1 and "model.safetensors" in errors[0], result.stderr


def test_serve_bad_flag_value(default_model_dir: Path) -> None:
    result = nanoserve("serve", str(default_model_dir), "--kv-cache-memory", "lots")
    assert result.returncode == 2
    assert "--kv-cache-memory" in result.stderr and "Traceback" not in result.stderr


def test_serve_port_in_use(server: ServerProcess, default_model_dir: Path) -> None:
    result = nanoserve("serve", str(default_model_dir), "--port", str(server.port))
    assert result.returncode == 1, result.stderr
    assert "address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_gguf_bad_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    result = nanoserve("convert-gguf", str(bad), str(tmp_path / "out"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert "bad.gguf" in result.stderr
    assert not (tmp_path / "out").exists()


def test_sigterm_lets_a_stream_finish(default_model_dir: Path, tmp_path: Path) -> None:
    """SIGTERM mid-stream: the stream still gets every token and [DONE], new connections are
    refused, and the process exits 0."""
    srv = start_server(
        default_model_dir, tmp_path / "server.log", "--kv-cache-memory", "64MiB",
        "--max-model-len", "512",
    )  # fmt: skip
    try:
        body = {
            "prompt": "Once",
            "max_tokens": 24,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        with srv.http() as http, http.stream("POST", "/v1/completions", json=body) as r:
            lines = r.iter_lines()
            events = [line for line in itertools.islice(lines, 6) if line.startswith("data: ")]
            srv.proc.send_signal(signal.SIGTERM)
            events += [line for line in itertools.islice(lines, 6) if line.startswith("data: ")]
            with pytest.raises(httpx.ConnectError):  # no longer listening
                httpx.get(f"{srv.base_url}/health", timeout=5)
            events += [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        # Every token arrived (a token may add no text of its own: a partial UTF-8 character).
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 24
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for c in chunks[:-1] if c["choices"][0]["text"]) >= 12
        assert srv.proc.wait(30) == 0, srv.log()[-4000:]
    finally:
        srv.stop()
    assert "Traceback" not in srv.log()


def test_readme_documents_every_serve_flag() -> None:
    from server.cli import build_parser

    readme = (REPO_ROOT / "README.md").read_text()
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in commands.choices.items():
        assert f"nanoserve {name}" in readme
        for action in sub._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help":
                    assert f"`{flag}`" in readme, f"{name} {flag} is not in README.md"


def test_quantization_auto_is_the_precision_the_weights_ship_in(
    default_model_dir: Path, tmp_path: Path
) -> None:
    """The default model (no model given) and a GGUF file run 4-bit on the CPU; a folder given
    runs as it is, CUDA unquantized, and an explicit choice stands."""
    from model.hub.default_model import ensure_default_gguf, gguf_model_dir
    from server.cli import resolve_quantization

    gguf = ensure_default_gguf(progress=False)
    assert resolve_quantization("auto", None, default_model_dir, "cpu") == "int4"
    assert resolve_quantization("auto", str(gguf), gguf_model_dir(str(gguf)), "cpu") == "int4"
    assert resolve_quantization("auto", str(default_model_dir), default_model_dir, "cpu") == "none"
    assert resolve_quantization("auto", None, default_model_dir, "cuda") == "none"
    assert resolve_quantization("auto", None, tmp_path, "cpu") == "none"  # no GGUF record
    assert resolve_quantization("int8", None, default_model_dir, "cpu") == "int8"
