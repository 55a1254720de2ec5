"""Tensor-parallel overhead: per-step broadcast, all-reduce and gather time against step time.

    python bench/tp_bench.py                             # default model, CPU gloo, sizes 1 and 3
    python bench/tp_bench.py --device cuda --tensor-parallel-size 2 --batches 1,32

For each batch size in --batches, one LLMEngine per size (1, then --tensor-parallel-size) runs
that many random prompts of --prompt-len tokens, then --new-tokens greedy decode steps
(ignore_eos), after a warm-up request, with a fixed seed. Decode steps are timed on rank 0,
and so are the collectives it makes in them (torch.distributed's broadcast, all_reduce and
gather wrapped with timers: on rank 0 a collective's time includes waiting for the slowest
rank). Prints ms per step, the collectives' share of it, and the step-time ratio TP=N / TP=1.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average, ratio

FIRST_TOKEN_ID = 32  # random prompts avoid the special tokens at the start of the vocabulary
COLLECTIVES = ("broadcast", "all_reduce", "gather")


@contextmanager
def timed_collectives(totals: dict[str, list[float]]) -> Iterator[None]:
    """Wrap torch.distributed's collectives so each call's wall time lands in totals[name]."""
    import torch
    import torch.distributed as dist

    originals = {name: getattr(dist, name) for name in COLLECTIVES}

    def wrap(name: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            totals[name].append(time.perf_counter() - start)
            return out

        return timed

    for name, fn in originals.items():
        setattr(dist, name, wrap(name, fn))
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)


def run_size(args: argparse.Namespace, model_dir: Path, size: int) -> dict[int, dict]:
    """{batch: {"step_s": ..., name: seconds per step, ...}} for one tensor-parallel size."""
    from model.engine.config import EngineConfig
    from model.engine.llm_engine import LLMEngine
    from model.sampling_params import SamplingParams

    config = EngineConfig(
        model_dir=str(model_dir),
        device=args.device,
        tensor_parallel_size=size,
        max_model_len=args.prompt_len + args.new_tokens + 1,
        kv_cache_memory_bytes=args.kv_cache_mib << 20,
    )
    engine = LLMEngine(config)
    vocab = engine.model_config.vocab_size
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=args.new_tokens, ignore_eos=True)
    engine.generate([[FIRST_TOKEN_ID] * 8], SamplingParams(max_tokens=2, ignore_eos=True))
    results = {}
    for batch in args.batches:
        prompts = [
            [rng.randrange(FIRST_TOKEN_ID, vocab) for _ in range(args.prompt_len)]
            for _ in range(batch)
        ]
        for i, prompt in enumerate(prompts):
            engine.add_request(f"bench-{batch}-{i}", prompt, params)
        while engine.scheduler.num_waiting:  # prefill, not timed
            engine.step()
        totals: dict[str, list[float]] = defaultdict(list)
        step_times = []
        with timed_collectives(totals):
            while engine.has_unfinished():
                start = time.perf_counter()
                engine.step()
                step_times.append(time.perf_counter() - start)
        num_steps = len(step_times)
        row = {"step_s": sum(step_times) / num_steps, "steps": num_steps}
        for name in COLLECTIVES:
            row[name] = sum(totals[name]) / num_steps
            row[f"{name}_calls"] = len(totals[name]) / num_steps
        results[batch] = row
    if engine.runner.driver is not None:
        engine.runner.driver.stop()
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model-dir", help="model folder (default: the default model)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tensor-parallel-size", type=int, default=3)
    p.add_argument("--batches", default="1,8", help="comma-separated decode batch sizes")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--kv-cache-mib", type=int, default=256)
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from model.hub.default_model import ensure_default_model

    model_dir = Path(args.model_dir) if args.model_dir else ensure_default_model()
    print(f"# tp_bench: {model_dir.name} on {args.device}; load average {load_average()}")
    sizes = [1, args.tensor_parallel_size]
    by_size = {size: run_size(args, model_dir, size) for size in sizes}
    header = "size batch   ms/step   broadcast ms (n)   all_reduce ms (n)   gather ms (n)   comm %"
    print(header)
    for size in sizes:
        for batch, row in by_size[size].items():
            comm = sum(row[name] for name in COLLECTIVES)
            cells = "   ".join(
                f"{row[name] * 1e3:8.2f} ({row[name + '_calls']:.0f})" for name in COLLECTIVES
            )
            share = 100 * comm / row["step_s"]
            print(f"{size:4d} {batch:5d} {row['step_s'] * 1e3:9.2f}   {cells}   {share:5.1f}")
    n = args.tensor_parallel_size
    for batch in args.batches:
        slower = ratio(by_size[n][batch]["step_s"], by_size[1][batch]["step_s"])
        print(f"batch {batch}: step time TP={n} / TP=1 = {slower}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
