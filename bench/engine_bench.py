"""Engine benchmark: nanoserve's LLMEngine vs Hugging Face transformers on the same weights.

    python bench/engine_bench.py                       # default model, CPU fp32, scaled-down workload
    python bench/engine_bench.py --num-seqs 256 --min-len 100 --max-len 1024   # nano-vllm's workload
    python bench/engine_bench.py --shape qwen3-0.6b --device cuda              # random weights, GPU
    python bench/engine_bench.py --quantization none,int8,int4 --parts decode --decode-batches 1
    python bench/engine_bench.py --quantization int4 --parts decode --decode-batches 1 --no-hf --count-ops

Measures, in one process, after a warm-up and with a fixed seed:
  (a) offline throughput: --num-seqs requests with prompt and output lengths drawn uniformly from
      [--min-len, --max-len], ignore_eos, greedy; output tok/s of LLMEngine.generate(). Baseline:
      transformers' continuous batching (the `generate_batch` machinery) where the installed
      version has it (--hf-throughput off skips it).
  (b) decode tok/s at each --decode-batches size (prompt --decode-prompt-len tokens, then
      --decode-new-tokens tokens, ignore_eos), timed over the decode steps only, with the
      memory traffic of a step (weights + the KV read) / step time in GB/s, its share of the
      machine's bandwidth (a large tensor copy and a large sum, measured in the same run), and
      the roofline tok/s that bandwidth implies.
      Baselines: transformers' `generate` at batch 1 and a fixed-batch greedy decode loop
      (model forward with its DynamicCache) at every batch size.
  (c) with --quantization listing more than one mode (CPU): the decode of (b) for each further
      mode's engine (weight-only int8 / int4 linear layers, model/layers/quant.py), measured
      alternately with the first mode's, with its ratio to the first mode.
  (d) --count-ops: the aten ops of a batch-1 decode step for each mode (torch.profiler).
Prints every figure and ours/HF ratios with the targets of the CPU default-model run.
--shape writes a random-weight checkpoint of a known shape (tokenizer of the default model) to a
temporary folder, so GPU shapes need no download.
"""

from __future__ import annotations

import argparse
import gc
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    SHAPES,
    load_average,
    measure_bandwidth_gbs,
    ratio,
    write_random_checkpoint,
)

GiB = 1 << 30
FIRST_TOKEN_ID = 32  # random prompts avoid the special tokens at the start of the vocabulary


@dataclass
class DecodeResult:
    tok_s: float
    step_s: float
    bytes_per_step: float

    @property
    def gb_s(self) -> float:
        return self.bytes_per_step / self.step_s / 1e9


def sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def random_prompts(rng: random.Random, lengths: list[int], vocab: int) -> list[list[int]]:
    return [[rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(n)] for n in lengths]


# ---- ours ---------------------------------------------------------------------------------


def build_engine(
    args,
    model_dir: Path,
    max_model_len: int,
    max_num_seqs: int,
    kv_tokens: int,
    quantization: str,
):
    """LLMEngine for the run; the CPU KV pool holds `kv_tokens` unless --kv-cache-gib says."""
    import torch

    from model.config import ModelConfig
    from model.engine.config import EngineConfig
    from model.engine.llm_engine import LLMEngine

    if args.kv_cache_gib is not None:
        kv_bytes = int(args.kv_cache_gib * GiB)
    else:
        mc = ModelConfig.from_dir(model_dir)
        elem = getattr(torch, args.dtype).itemsize
        per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elem
        kv_bytes = (kv_tokens + 16 * max_num_seqs) * per_token
    return LLMEngine(
        EngineConfig(
            model_dir=str(model_dir),
            device=args.device,
            dtype=args.dtype,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            kv_cache_memory_bytes=kv_bytes,
            gpu_memory_utilization=args.gpu_memory_utilization,
            cpu_packed_weights=not args.plain_linear,
            enforce_eager=args.enforce_eager,
            quantization=quantization,
        )
    )


def ours_throughput(engine, prompts: list[list[int]], output_lens: list[int]) -> tuple[float, int]:
    """(seconds, output tokens) of LLMEngine.generate() over the whole workload."""
    from model.sampling_params import SamplingParams

    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in output_lens]
    sync(engine.runner.device)
    t0 = time.perf_counter()
    results = engine.generate(prompts, params)
    sync(engine.runner.device)
    elapsed = time.perf_counter() - t0
    num_out = sum(len(d.token_ids) for choices in results for d in choices)
    assert num_out == sum(output_lens), (num_out, sum(output_lens))
    return elapsed, num_out


def ours_decode(
    engine, prompts: list[list[int]], num_new: int, weight_bytes: int, kv_bytes_per_token: int
) -> DecodeResult:
    """Decode steps of a batch whose prompts are all prefilled, timed one by one."""
    from model.sampling_params import SamplingParams

    batch = len(prompts)
    params = SamplingParams(max_tokens=num_new, temperature=0.0, ignore_eos=True)
    ids = [f"decode-{batch}-{i}-{time.monotonic_ns()}" for i in range(batch)]
    for rid, prompt in zip(ids, prompts, strict=True):
        engine.add_request(rid, prompt, params)
    started: set[str] = set()
    step_times: list[float] = []
    ctx_tokens: list[int] = []
    while engine.has_unfinished():
        is_decode = len(started) == batch
        t0 = time.perf_counter()
        outputs = engine.step()
        dt = time.perf_counter() - t0
        for rid, delta in outputs:
            if isinstance(delta, Exception):
                raise delta
            started.add(rid)
        # Prefill chunks stagger the batch by a few tokens: time only the steps in which every
        # sequence decodes (not the tail where the earliest ones have finished).
        if is_decode and len(outputs) == batch:
            step_times.append(dt)
            # the step that samples output j reads a context of prompt + j - 1 tokens
            ctx_tokens.append(
                sum(len(p) for p in prompts)
                + sum(delta.num_output_tokens - 1 for _, delta in outputs)
            )
    assert step_times, "no decode step with the whole batch: raise --decode-new-tokens"
    total_s = sum(step_times)
    step_s = total_s / len(step_times)
    mean_ctx = sum(ctx_tokens) / len(ctx_tokens)
    return DecodeResult(
        tok_s=batch * len(step_times) / total_s,
        step_s=step_s,
        bytes_per_step=weight_bytes + mean_ctx * kv_bytes_per_token,
    )


def ops_per_decode_step(engine, prompt: list[int], num_steps: int = 8) -> tuple[float, float]:
    """(aten ops called from Python, all aten ops including those inside composite ones) per
    batch-1 decode step, counted by torch.profiler over `num_steps` steps after the prefill."""
    from torch.profiler import ProfilerActivity, profile

    from model.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=num_steps + 1, temperature=0.0, ignore_eos=True)
    engine.add_request(f"ops-{time.monotonic_ns()}", prompt, params)
    while not engine.step():  # prefill chunks until the first token
        pass
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(num_steps):
            engine.step()
    while engine.has_unfinished():
        engine.step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    top = [e for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")]
    return len(top) / num_steps, len(aten) / num_steps


def model_bytes(engine) -> tuple[int, int]:
    """(weight bytes one decode step reads, KV bytes per token of context)."""
    from model.layers.linear import Linear

    model = engine.runner.model
    elem = engine.runner.kv_cache.element_size()
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # Layers running from oneDNN-packed or quantized weights have released their plain ones:
    # count the shape, or the quantized bytes.
    for m in model.modules():
        if isinstance(m, Linear) and m.weight is None:
            quantized = m.quantized
            weight_bytes += quantized.nbytes if quantized else m.in_features * m.out_features * elem
    # A step reads only a few embedding rows unless the (tied) LM head is the embedding itself.
    if model.lm_head is not None or model.lm_head_quantized is not None:
        emb = model.model.embed_tokens.weight
        weight_bytes -= emb.numel() * emb.element_size()
    if model.lm_head is None and model.lm_head_quantized is not None:
        weight_bytes += model.lm_head_quantized.nbytes
    mc = engine.model_config
    kv_bytes_per_token = 2 * mc.num_hidden_layers * mc.num_key_value_heads * mc.head_dim * elem
    return weight_bytes, kv_bytes_per_token


# ---- Hugging Face transformers --------------------------------------------------------------


def load_hf(model_dir: Path, device: str, dtype):
    import logging

    import transformers
    from transformers import AutoModelForCausalLM

    transformers.utils.logging.disable_progress_bar()
    # CPU runs of continuous batching log psutil hints at ERROR level; they are not failures.
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.CRITICAL)

    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=dtype)
    return model.to(device).eval()


def hf_generate_decode(model, prompt: list[int], num_new: int, device: str) -> float:
    """Batch-1 decode tok/s of `generate`: (N - 1) tokens / (time(N tokens) - time(1 token))."""
    import torch

    ids = torch.tensor([prompt], device=device)

    def timed(n: int) -> float:
        sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,  # ignore_eos
                do_sample=False,
                pad_token_id=0,
            )
        sync(device)
        assert out.shape[1] == ids.shape[1] + n
        return time.perf_counter() - t0

    timed(num_new)  # warm-up at the full length
    t_first = min(timed(1) for _ in range(2))
    t_all = timed(num_new)
    return (num_new - 1) / max(t_all - t_first, 1e-9)


def hf_loop_decode(
    model, prompts: list[list[int]], num_new: int, device: str, bytes_of_step
) -> DecodeResult:
    """A fixed batch of same-length prompts: one prefill forward, then greedy decode forwards
    through the model's own DynamicCache; only the decode forwards are timed."""
    import torch

    batch, prompt_len = len(prompts), len(prompts[0])
    ids = torch.tensor(prompts, device=device)
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        cache = out.past_key_values
        next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        t0 = time.perf_counter()
        for _ in range(num_new - 1):
            out = model(input_ids=next_ids, past_key_values=cache, use_cache=True)
            next_ids = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        elapsed = time.perf_counter() - t0
    num_steps = num_new - 1
    mean_ctx = prompt_len + 1 + num_steps / 2
    return DecodeResult(
        tok_s=batch * num_steps / elapsed,
        step_s=elapsed / num_steps,
        bytes_per_step=bytes_of_step(batch * mean_ctx),
    )


def hf_continuous_batching(
    model, prompts: list[list[int]], output_lens: list[int]
) -> tuple[float, int]:
    """(seconds, output tokens) of transformers' continuous batching on the workload.

    Uses the manager behind `generate_batch` so each request keeps its own output length; EOS
    disabled (id -1). Raises when the installed transformers lacks it or its API differs.
    """
    from transformers import GenerationConfig

    if not hasattr(model, "continuous_batching_context_manager"):
        raise RuntimeError("this transformers has no continuous batching (generate_batch)")
    config = GenerationConfig(
        max_new_tokens=max(output_lens), do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    results = {}
    t0 = time.perf_counter()
    with model.continuous_batching_context_manager(
        generation_config=config, block=True, timeout=30
    ) as manager:
        t0 = time.perf_counter()  # after the manager's own warm-up
        for i, (prompt, n) in enumerate(zip(prompts, output_lens, strict=True)):
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        while len(results) < len(prompts):
            result = manager.get_result(timeout=1)
            if result is not None and result.is_finished():
                if result.error is not None:
                    raise RuntimeError(f"request {result.request_id} failed: {result.error}")
                results[result.request_id] = result
            elif result is None and not manager.is_running():
                raise RuntimeError("the continuous batching thread stopped")
    elapsed = time.perf_counter() - t0
    return elapsed, sum(len(r.generated_tokens) for r in results.values())


# ---- the run ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", help="model folder (default: the default model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="random weights of this shape instead")
    p.add_argument("--checkpoint-dir", help="where --shape writes (kept); default: a temp dir")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parts", default="throughput,decode", help="throughput,decode")
    p.add_argument("--num-seqs", type=int, default=32, help="(a) requests (nano-vllm: 256)")
    p.add_argument("--min-len", type=int, default=32, help="(a) shortest prompt/output (100)")
    p.add_argument("--max-len", type=int, default=128, help="(a) longest prompt/output (1024)")
    p.add_argument("--decode-batches", default="1,16,64")
    p.add_argument("--decode-prompt-len", type=int, default=32)
    p.add_argument("--decode-new-tokens", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, help="engine token budget per step")
    p.add_argument(
        "--kv-cache-gib", type=float, help="CPU KV pool size (default: what the workload needs)"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="decode runs per side, alternating; best is kept"
    )
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument(
        "--plain-linear",
        action="store_true",
        help="CPU: F.linear on the stored weights instead of oneDNN-packed ones",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="no CUDA graphs; CPU: no compiled decode step of one sequence",
    )
    p.add_argument(
        "--quantization",
        default="none",
        help="CPU: comma-separated weight modes (none, int8, int4); the first is the main engine, "
        "each further one is measured against it in (c)",
    )
    p.add_argument("--no-hf", action="store_true", help="skip the transformers baselines")
    p.add_argument(
        "--count-ops", action="store_true", help="count the aten ops of a batch-1 decode step"
    )
    p.add_argument(
        "--hf-throughput",
        choices=["on", "off"],
        default="on",
        help="transformers continuous batching (generate_batch) as the baseline of (a)",
    )
    args = p.parse_args(argv)
    args.parts = {s.strip() for s in args.parts.split(",") if s.strip()}
    args.decode_batches = [int(b) for b in args.decode_batches.split(",") if b.strip()]
    args.quantization = [q.strip() for q in args.quantization.split(",") if q.strip()]
    assert args.quantization and set(args.quantization) <= {"none", "int8", "int4"}, (
        args.quantization
    )
    assert args.parts <= {"throughput", "decode"}, args.parts
    assert 1 <= args.min_len <= args.max_len and args.decode_new_tokens >= 2
    return args


def resolve_model_dir(args, tmp_dirs: list[Path]) -> Path:
    from model.hub.default_model import ensure_default_model

    if args.shape is None:
        return Path(args.model_dir) if args.model_dir else ensure_default_model()
    tokenizer_dir = Path(args.model_dir) if args.model_dir else ensure_default_model()
    if args.checkpoint_dir:
        out = Path(args.checkpoint_dir)
    else:
        out = Path(tempfile.mkdtemp(prefix=f"nanoserve-bench-{args.shape}-"))
        tmp_dirs.append(out)
    if not (out / "config.json").is_file():
        t0 = time.perf_counter()
        write_random_checkpoint(
            args.shape, out, tokenizer_dir, dtype=args.dtype, device=args.device, seed=args.seed
        )
        print(f"wrote random {args.shape} checkpoint to {out} in {time.perf_counter() - t0:.1f} s")
    return out


def main(argv: list[str] | None = None) -> int:
    import torch

    args = parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    is_cuda = args.device.startswith("cuda")
    if args.dtype == "auto":
        args.dtype = "bfloat16" if is_cuda else "float32"
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tmp_dirs: list[Path] = []
    try:
        return run(args, resolve_model_dir(args, tmp_dirs), is_cuda)
    finally:
        for d in tmp_dirs:
            shutil.rmtree(d, ignore_errors=True)


@dataclass
class Results:
    copy_gbs: float
    read_gbs: float
    prompt_lens: list[int]
    ours_tp: tuple[float, int] | None = None  # (seconds, output tokens)
    hf_tp: tuple[float, int] | str | None = None  # or why it is unavailable
    decode_ours: dict[int, DecodeResult] = field(default_factory=dict)
    decode_hf: dict[int, DecodeResult] = field(default_factory=dict)
    # further --quantization modes: mode -> batch -> result
    decode_modes: dict[str, dict[int, DecodeResult]] = field(default_factory=dict)
    hf_generate_b1: float | None = None
    ops: dict[str, tuple[float, float]] = field(default_factory=dict)  # --count-ops, per mode

    def keep_best(self, results: dict[int, DecodeResult], batch: int, new: DecodeResult) -> None:
        if batch not in results or new.tok_s > results[batch].tok_s:
            results[batch] = new


def run(args, model_dir: Path, is_cuda: bool) -> int:
    import torch

    device, dtype = args.device, getattr(torch, args.dtype)
    rng = random.Random(args.seed)
    print(
        f"engine_bench: model {model_dir.name} ({model_dir}), device {device}, dtype {args.dtype}"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load {load_average()}")
    buffer_bytes = (2 * GiB) if is_cuda else (512 << 20)
    copy_gbs, read_gbs = measure_bandwidth_gbs(device, buffer_bytes)
    print(
        f"memory bandwidth: copy (read + write) {copy_gbs:.1f} GB/s, read (sum) {read_gbs:.1f} GB/s"
    )

    batches = args.decode_batches if "decode" in args.parts else []
    do_throughput = "throughput" in args.parts
    max_model_len = args.decode_prompt_len + args.decode_new_tokens + 16
    if do_throughput:
        max_model_len = max(max_model_len, 2 * args.max_len + 16)
    max_num_seqs = max([args.num_seqs if do_throughput else 1, *batches])
    kv_tokens = max(
        2 * args.max_len * args.num_seqs if do_throughput else 0,
        max(batches or [4]) * (args.decode_prompt_len + args.decode_new_tokens),
        max_model_len,
    )
    engines = {}  # --quantization mode -> (engine, weight bytes per step)
    for mode in args.quantization:
        t0 = time.perf_counter()
        mode_engine = build_engine(args, model_dir, max_model_len, max_num_seqs, kv_tokens, mode)
        engines[mode] = (mode_engine, model_bytes(mode_engine)[0])
        print(
            f"ours ({mode} weights) loaded in {time.perf_counter() - t0:.1f} s: weights read per "
            f"step {engines[mode][1] / 1e6:.1f} MB"
        )
    engine, weight_bytes = engines[args.quantization[0]]
    vocab = min(engine.model_config.vocab_size, engine.tokenizer.vocab_size)
    kv_bytes_per_token = model_bytes(engine)[1]
    print(f"KV {kv_bytes_per_token / 1e3:.1f} kB/token, KV pool {engine.num_kv_tokens} tokens")

    def bytes_of_step(num_ctx_tokens: float) -> float:
        return weight_bytes + num_ctx_tokens * kv_bytes_per_token

    # The workload, drawn once: both engines see the same prompts.
    prompt_lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_seqs)]
    output_lens = [rng.randint(args.min_len, args.max_len) for _ in range(args.num_seqs)]
    tp_prompts = random_prompts(rng, prompt_lens, vocab) if do_throughput else []
    decode_prompts = {b: random_prompts(rng, [args.decode_prompt_len] * b, vocab) for b in batches}
    # Warm-up: a prefill and a few batched decode steps at the largest batch.
    warm = random_prompts(rng, [args.decode_prompt_len] * max(batches or [4]), vocab)
    budget = engine.config.max_num_batched_tokens
    num_prefill_steps = -(-len(warm) * args.decode_prompt_len // budget)
    for mode_engine, mode_bytes in engines.values():
        ours_decode(mode_engine, warm, 4 + num_prefill_steps, mode_bytes, kv_bytes_per_token)

    res = Results(copy_gbs, read_gbs, prompt_lens)
    run_hf = not args.no_hf
    # On the CPU both models fit: interleave the measurements so load drifts hit both alike.
    hf = load_hf(model_dir, device, dtype) if run_hf and not is_cuda else None

    def measure_hf_decode(batch: int) -> None:
        prompts = decode_prompts[batch]
        hf_loop_decode(hf, prompts, 3, device, bytes_of_step)  # warm-up
        new = hf_loop_decode(hf, prompts, args.decode_new_tokens, device, bytes_of_step)
        res.keep_best(res.decode_hf, batch, new)
        if batch == 1:
            tok_s = hf_generate_decode(hf, prompts[0], args.decode_new_tokens, device)
            res.hf_generate_b1 = max(res.hf_generate_b1 or 0.0, tok_s)

    if do_throughput:
        res.ours_tp = ours_throughput(engine, tp_prompts, output_lens)
    for batch in batches:
        for _ in range(args.repeats):
            new = ours_decode(
                engine,
                decode_prompts[batch],
                args.decode_new_tokens,
                weight_bytes,
                kv_bytes_per_token,
            )
            res.keep_best(res.decode_ours, batch, new)
            for mode in args.quantization[1:]:
                mode_engine, mode_bytes = engines[mode]
                new = ours_decode(
                    mode_engine,
                    decode_prompts[batch],
                    args.decode_new_tokens,
                    mode_bytes,
                    kv_bytes_per_token,
                )
                res.keep_best(res.decode_modes.setdefault(mode, {}), batch, new)
            if hf is not None:
                measure_hf_decode(batch)
    if run_hf and is_cuda:  # free our weights and KV pool before loading the baseline
        del engine, engines
        gc.collect()
        torch.cuda.empty_cache()
        hf = load_hf(model_dir, device, dtype)
        for batch in batches:
            for _ in range(args.repeats):
                measure_hf_decode(batch)
    if run_hf and args.hf_throughput == "on" and do_throughput:
        try:
            res.hf_tp = hf_continuous_batching(hf, tp_prompts, output_lens)
        except Exception as exc:  # optional baseline: an API change must not end the run
            res.hf_tp = f"unavailable: {type(exc).__name__}: {exc}"
    if args.count_ops:
        prompt = decode_prompts[batches[0]][0] if batches else warm[0]
        for mode, (mode_engine, _) in engines.items():
            res.ops[mode] = ops_per_decode_step(mode_engine, prompt)
    # Bandwidth again at the end (a busy machine lowers it); the best of both is the roofline.
    copy_gbs, read_gbs = measure_bandwidth_gbs(device, buffer_bytes)
    res.copy_gbs, res.read_gbs = max(res.copy_gbs, copy_gbs), max(res.read_gbs, read_gbs)
    report(args, res)
    return 0


def report(args, res: Results) -> None:
    print(
        f"\nsummary (load average {load_average()}; bandwidth: copy {res.copy_gbs:.1f} GB/s, "
        f"read {res.read_gbs:.1f} GB/s):"
    )
    if res.ours_tp is not None:
        elapsed, num_out = res.ours_tp
        num_prompt = sum(res.prompt_lens)
        ours_tps = num_out / elapsed
        print(
            f"  throughput: {args.num_seqs} seqs, prompt and output lengths uniform in "
            f"[{args.min_len}, {args.max_len}] ({num_prompt} prompt + {num_out} output "
            "tokens, greedy, ignore_eos)"
        )
        print(
            f"    ours              {ours_tps:9.1f} output tok/s ({elapsed:.2f} s; "
            f"{(num_prompt + num_out) / elapsed:.1f} prompt+output tok/s)"
        )
        if isinstance(res.hf_tp, tuple):
            hf_s, hf_out = res.hf_tp
            print(
                f"    HF generate_batch {hf_out / hf_s:9.1f} output tok/s ({hf_s:.2f} s, "
                f"{hf_out} tokens)   ours/HF {ratio(ours_tps, hf_out / hf_s)}"
            )
        elif res.hf_tp is not None:
            print(f"    HF generate_batch {res.hf_tp}")
    if res.decode_ours:
        print(
            f"  decode: prompt {args.decode_prompt_len} tokens then {args.decode_new_tokens} new, "
            "greedy, ignore_eos; decode steps only; GB/s = (weights + KV read) / step time"
        )
    for batch, ours in res.decode_ours.items():
        roofline = batch * res.read_gbs * 1e9 / ours.bytes_per_step
        print(
            f"    b={batch:<3d} ours       {ours.tok_s:8.1f} tok/s {ours.step_s * 1e3:7.1f} ms/step "
            f"{ours.gb_s:6.1f} GB/s = {ours.gb_s / res.read_gbs:4.0%} of read bw, "
            f"{ours.gb_s / res.copy_gbs:4.0%} of copy bw (read roofline {roofline:.0f} tok/s)"
        )
        theirs = res.decode_hf.get(batch)
        if theirs is not None:
            print(
                f"          HF loop    {theirs.tok_s:8.1f} tok/s {theirs.step_s * 1e3:7.1f} ms/step "
                f"{theirs.gb_s:6.1f} GB/s   ours/HF loop {ratio(ours.tok_s, theirs.tok_s)}"
            )
        for mode, results in res.decode_modes.items():
            other = results[batch]
            print(
                f"          {mode:<10s} {other.tok_s:8.1f} tok/s {other.step_s * 1e3:7.1f} ms/step "
                f"{other.gb_s:6.1f} GB/s   {mode}/{args.quantization[0]} "
                f"{ratio(other.tok_s, ours.tok_s)}"
            )
        if batch == 1 and res.hf_generate_b1 is not None:
            print(
                f"          HF generate {res.hf_generate_b1:7.1f} tok/s{'':33s}ours/HF generate "
                f"{ratio(ours.tok_s, res.hf_generate_b1)}"
            )
    for mode, (top, every) in res.ops.items():
        print(
            f"  ops per batch-1 decode step ({mode} weights): {top:.0f} aten ops called from "
            f"Python, {every:.0f} counting those inside composite ops"
        )
    print(
        "targets (default model, 2 CPU cores, fp32): b=1 ours/HF generate >= 1.0x; "
        "b=64 ours/HF loop >= 1.0x"
    )


if __name__ == "__main__":
    sys.exit(main())
