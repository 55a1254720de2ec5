"""Helpers shared by the benchmarks: statistics, machine load, bandwidth, random checkpoints.

Runnable scripts in bench/ call `add_repo_to_path()` first so `python bench/x.py` and
`python -m bench.x` both import the project's packages.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
GiB = 1 << 30
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


def add_repo_to_path() -> None:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) as numpy's default; nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def ratio(ours: float, theirs: float) -> str:
    if not theirs or math.isnan(theirs) or math.isnan(ours):
        return "n/a"
    return f"{ours / theirs:.2f}x"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout_s: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def wait_ready(url: str, proc: subprocess.Popen | None, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before it was ready")
        with contextlib.suppress(OSError):
            if http_get(url + path, timeout_s=2.0)[0] == 200:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{url}{path} not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def launched(
    cmd: list[str],
    ready_path: str,
    port: int,
    log_name: str,
    timeout_s: float,
    env: dict[str, str] | None = None,
):
    """Start a server subprocess (`env`: extra environment variables), wait until `ready_path`
    answers 200, stop it on exit."""
    with tempfile.NamedTemporaryFile(prefix=f"{log_name}-", suffix=".log", delete=False) as log:
        print(f"starting {log_name}: {' '.join(cmd)} (log {log.name})", flush=True)
        proc = subprocess.Popen(
            cmd,
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        url = f"http://127.0.0.1:{port}"
        try:
            t0 = time.perf_counter()
            wait_ready(url, proc, ready_path, timeout_s)
            print(f"{log_name} ready in {time.perf_counter() - t0:.1f} s", flush=True)
            yield url
        except Exception:
            log.flush()
            print(Path(log.name).read_text(errors="replace")[-3000:], file=sys.stderr)
            raise
        finally:
            stop_process(proc, timeout_s=30)


def stop_process(proc: subprocess.Popen, timeout_s: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited after `timeout_s`."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def measure_bandwidth_gbs(device: str = "cpu", num_bytes: int = 512 << 20) -> tuple[float, float]:
    """Achievable memory bandwidth in GB/s: (copy, read).

    copy: a large tensor copy, (read + write bytes) / time; read: a sum over the same tensor,
    bytes read / time (what a decode step does with its weights). Best of several runs; the
    buffers are far larger than any cache.
    """
    import torch

    numel = num_bytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    is_cuda = src.device.type == "cuda"

    def best_s(fn) -> float:
        best = math.inf
        for _ in range(8):
            if is_cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        return best

    copy_gbs = 2 * numel * 4 / best_s(lambda: dst.copy_(src)) / 1e9
    read_gbs = numel * 4 / best_s(src.sum) / 1e9
    return copy_gbs, read_gbs


# ---- random-weight checkpoints of well-known shapes ---------------------------------------

_LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu"}
SHAPES: dict[str, dict] = {
    # A few layers of a tiny model: exercises every code path in seconds on a CPU.
    "tiny": _LLAMA
    | {
        "vocab_size": 49152,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "smollm2-135m": _LLAMA
    | {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000.0,
        "tie_word_embeddings": True,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "hidden_act": "silu",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "attention_bias": False,
        "tie_word_embeddings": True,
    },
    "llama-3.2-1b": _LLAMA
    | {
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": True,
    },
    "llama-3-8b": _LLAMA
    | {
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
    },
}


def _tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Hugging Face tensor names and shapes of a Llama/Qwen3 checkpoint of this config."""
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = cfg["head_dim"]
    q_size = cfg["num_attention_heads"] * head_dim
    kv_size = cfg["num_key_value_heads"] * head_dim
    shapes = [("model.embed_tokens.weight", (cfg["vocab_size"], hidden))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (q_size, hidden)),
            (p + "self_attn.k_proj.weight", (kv_size, hidden)),
            (p + "self_attn.v_proj.weight", (kv_size, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, q_size)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
        if cfg["model_type"] == "qwen3":
            shapes += [
                (p + "self_attn.q_norm.weight", (head_dim,)),
                (p + "self_attn.k_norm.weight", (head_dim,)),
            ]
    shapes.append(("model.norm.weight", (hidden,)))
    if not cfg["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (cfg["vocab_size"], hidden)))
    return shapes


def write_random_checkpoint(
    shape: str,
    out_dir: Path,
    tokenizer_dir: Path,
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
    shard_bytes: int = 4 * GiB,
) -> Path:
    """A Hugging Face model folder of the named shape with random weights (std 0.02, norms 1).

    Writes config.json, model.safetensors (or shards and an index) and copies the tokenizer
    files of `tokenizer_dir`. Weights are drawn on `device` (fast on a GPU) and stored in `dtype`.
    """
    import torch
    from safetensors.torch import save_file

    cfg = dict(SHAPES[shape])
    cfg.update(
        bos_token_id=1, eos_token_id=2, torch_dtype=dtype, initializer_range=0.02, use_cache=True
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out_dir / name)
    torch_dtype = getattr(torch, dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_size = 0
    for name, tshape in _tensor_shapes(cfg):
        if len(tshape) == 1:
            tensor = torch.ones(tshape, dtype=torch_dtype)
        else:
            tensor = torch.empty(tshape, dtype=torch.float32, device=device)
            tensor.normal_(0.0, 0.02, generator=gen)
            tensor = tensor.to(torch_dtype).cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shard_size and shard_size + nbytes > shard_bytes:
            shards.append({})
            shard_size = 0
        shards[-1][name] = tensor
        shard_size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return out_dir
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        for name, tensor in shard.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return out_dir
