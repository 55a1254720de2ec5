"""`nanoserve serve --tensor-parallel-size 3` on the default model (3 KV heads), CPU and gloo.

Three ranks give the greedy text of one (the shared one-rank `server`); SIGTERM stops every
rank; a killed worker makes the server exit non-zero with a message, leaving nothing behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from tests.e2e.conftest import (
    REPO_ROOT,
    ServerProcess,
    free_port,
    serve_command,
    start_server,
    stop_and_check,
)

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time"]
MAX_TOKENS = 12
EXIT_TIMEOUT_S = 15.0


def start_tp_server(default_model_dir: Path, tmp_path: Path) -> ServerProcess:
    return start_server(
        default_model_dir,
        tmp_path / "server.log",
        "--tensor-parallel-size",
        "3",
        "--max-model-len",
        "1024",
        "--kv-cache-memory",
        "128MiB",
    )


def worker_pids(server: ServerProcess) -> list[int]:
    """The server's spawned tensor-parallel workers (its other child is the resource tracker)."""
    pids = []
    # /proc lists children per thread; the engine thread spawned these.
    tasks = Path(f"/proc/{server.proc.pid}/task").iterdir()
    children = " ".join((task / "children").read_text() for task in tasks)
    for pid in map(int, children.split()):
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if b"spawn_main" in cmdline:
            pids.append(pid)
    return pids


def is_running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def greedy_texts(server: ServerProcess) -> list[str]:
    """One request for every prompt (one batch in the engine: fewer steps)."""
    completion = server.openai().completions.create(
        model=server.model, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0.0
    )
    choices = sorted(completion.choices, key=lambda c: c.index)
    assert [c.finish_reason for c in choices] == ["length"] * len(PROMPTS)
    return [c.text for c in choices]


def test_three_ranks_give_the_greedy_text_of_one_and_stop_together(
    server, default_model_dir, tmp_path
):
    tp_server = start_tp_server(default_model_dir, tmp_path)
    try:
        workers = worker_pids(tp_server)
        assert len(workers) == 2
        assert greedy_texts(tp_server) == greedy_texts(server)
        assert "tensor parallel over 3 ranks (gloo)" in tp_server.log()
    finally:
        stop_and_check(tp_server)
    assert not [pid for pid in workers if is_running(pid)], "workers outlived SIGTERM"


def test_a_killed_worker_ends_the_server_non_zero(default_model_dir, tmp_path):
    tp_server = start_tp_server(default_model_dir, tmp_path)
    try:
        workers = worker_pids(tp_server)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        start = time.monotonic()
        code = tp_server.proc.wait(EXIT_TIMEOUT_S)
    finally:
        tp_server.stop()
    assert code != 0
    assert time.monotonic() - start < 5.0
    log = tp_server.log()
    assert "tensor-parallel worker rank" in log and "exited with code -9" in log, log[-4000:]
    deadline = time.monotonic() + 5.0
    while any(is_running(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in workers if is_running(pid)], "a worker outlived the server"


def test_a_size_that_does_not_divide_the_kv_heads_is_refused(default_model_dir):
    cmd = serve_command(default_model_dir, free_port(), "--tensor-parallel-size", "2")
    result = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "tensor_parallel_size 2 does not divide the model's 3 KV heads" in result.stderr
    assert "sizes that work: 1, 3" in result.stderr
