"""The walk of one streaming chat completion through our code: files crossed and hops between them.

Runs `nanoserve serve` in this process with a profile hook on every thread, sends one warm-up
request, then one streaming chat completion, and records each call from one of our files
(server/, model/) into another between sending the request and reading its first content delta.
Prints the files in the order first reached and the distinct caller -> callee file pairs (hops).

    .venv/bin/python bench/request_walk.py [--model-dir DIR] [--verbose]
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
OUR_DIRS = tuple(str(REPO_ROOT / name) + "/" for name in ("server", "model"))

is_tracing = False
files_in_order: dict[str, None] = {}
hops: dict[tuple[str, str], int] = {}


def _ours(path: str) -> str | None:
    return path[len(str(REPO_ROOT)) + 1 :] if path.startswith(OUR_DIRS) else None


def profile(frame, event, arg):  # noqa: ARG001 - the sys.setprofile signature
    if not is_tracing or event != "call":
        return
    callee = _ours(frame.f_code.co_filename)
    if callee is None:
        return
    files_in_order.setdefault(callee, None)
    caller_frame = frame.f_back
    while caller_frame is not None and _ours(caller_frame.f_code.co_filename) is None:
        caller_frame = caller_frame.f_back  # through the stdlib (asyncio, threading) to our caller
    if caller_frame is not None:
        caller = _ours(caller_frame.f_code.co_filename)
        if caller != callee:
            hops[(caller, callee)] = hops.get((caller, callee), 0) + 1


def first_delta(port: int) -> str:
    body = {
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        for line in response:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"]
            if delta.get("content"):
                return delta["content"]
    raise RuntimeError("the stream ended without content")


def wait_ready(port: int, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become ready")


def main() -> int:
    global is_tracing
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", help="model folder (default: the default model)")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--verbose", action="store_true", help="list every hop")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO_ROOT))
    from server.cli import main as cli_main

    def client() -> None:
        global is_tracing
        try:
            wait_ready(args.port)
            first_delta(args.port)  # warm-up: lazy imports and first-call paths
            is_tracing = True
            first_delta(args.port)
            is_tracing = False
        finally:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGINT)

    argv = ["serve", "--port", str(args.port), "--log-level", "warning"]
    if args.model_dir:
        argv.insert(1, args.model_dir)
    threading.setprofile(profile)
    sys.setprofile(profile)
    threading.Thread(target=client, daemon=True).start()
    cli_main(argv)
    sys.setprofile(None)
    print(f"{len(files_in_order)} files, {len(hops)} distinct hops between files")
    for name in files_in_order:
        print(f"  {name}")
    if args.verbose:
        for (caller, callee), count in sorted(hops.items()):
            print(f"  {caller} -> {callee}  x{count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
