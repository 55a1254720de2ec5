"""Structured outputs: compile time per schema and mask time per step, on the default
vocabulary (49k) and a 150k one.

    .venv/bin/python bench/structured_bench.py [--walks 3] [--max-tokens 100] [--http]

Compile: ``compile_automaton`` per corpus schema (tests/model/structured/corpus.py), p50/max
(targets 20 ms / 200 ms on the default vocabulary). Masks: random walks (uniformly random
allowed tokens until the automaton accepts), the time of ``GrammarMatcher.fill_mask`` per
sequence per step, cache misses included (a fresh compiler per vocabulary, so every state is a
miss the first time), at batch 1 and 16 (16 independent walks in lockstep, one
``fill_masks`` per step). Baseline: numpy argmax over random logits of the vocab size (the
cost of an unconstrained greedy step without any grammar), measured in the same run.
The 150k vocabulary is the default one extended with concatenations of two random default
tokens (fixed seed) up to 151,643 tokens (Qwen2's count): longer tokens, a deeper trie.

--http: through a launched server (the default model), --concurrency streams of the same
completion requests (bench/serve_bench.py's workload: distinct prompts ending in a count,
`ignore_eos`, `min_tokens` = max_tokens = --output-len) unconstrained and then constrained by
a JSON schema (an array of at least 1,000 integers, so that no answer can end early), both in
one run, twice, alternating (the second round counts); TPOT p50/p99 of each and their ratio
(target constrained <= 1.10x).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from model.hub.default_model import ensure_default_model
from model.structured import (
    GrammarCompiler,
    GrammarMatcher,
    StructuredSpec,
    VocabIndex,
    compile_automaton,
    fill_masks,
)
from model.text.tokenizer import Tokenizer
from tests.model.structured.corpus import CORPUS

QWEN_VOCAB_SIZE = 151_643


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def default_vocab() -> tuple[list[bytes], list[int]]:
    tokenizer = Tokenizer.from_dir(ensure_default_model())
    return [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)], sorted(
        tokenizer.skipped_special_ids
    )


def extended_vocab(tokens: list[bytes], special: list[int], size: int, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    normal = [t for i, t in enumerate(tokens) if i not in set(special) and t]
    seen, out = set(tokens), list(tokens)
    while len(out) < size:
        a, b = rng.integers(len(normal), size=2)
        token = normal[a] + normal[b]
        if token not in seen:
            seen.add(token)
            out.append(token)
    return out


def bench_compile() -> list[float]:
    times = []
    for schema in CORPUS.values():
        compile_automaton(StructuredSpec("json_schema", schema))  # warm-up: imports, caches
    for name, schema in CORPUS.items():
        start = time.perf_counter()
        automaton = compile_automaton(StructuredSpec("json_schema", schema))
        times.append((time.perf_counter() - start) * 1e3)
        print(f"  {name:28s} {automaton.num_states:6d} states {times[-1]:8.2f} ms")
    return times


def bench_masks(
    vocab: VocabIndex, batch: int, num_walks: int, max_tokens: int, seed: int
) -> tuple[list[float], int, int]:
    """Per sequence per step fill times (ms) over random walks; (times, misses, hits)."""
    compiler = GrammarCompiler(vocab)
    rng = np.random.default_rng(seed)
    times: list[float] = []
    out = np.zeros((batch, vocab.vocab_size), dtype=bool)
    for schema in CORPUS.values():
        grammar = compiler.compile(StructuredSpec("json_schema", schema))
        for _ in range(num_walks):
            matchers: list[GrammarMatcher | None] = [GrammarMatcher(grammar) for _ in range(batch)]
            for _ in range(max_tokens):
                live = [m for m in matchers if m is not None]
                if not live:
                    break
                start = time.perf_counter()
                fill_masks(matchers, out)
                times.append((time.perf_counter() - start) * 1e3 / batch)
                for row, matcher in enumerate(matchers):
                    if matcher is None:
                        continue
                    if matcher.is_accepting():
                        matchers[row] = None
                        continue
                    allowed = np.flatnonzero(out[row])
                    assert matcher.accept_token(int(allowed[rng.integers(allowed.size)]))
    misses = sum(g.masker.num_misses for g in compiler._cache.values())
    hits = sum(g.masker.num_hits for g in compiler._cache.values())
    return times, misses, hits


def bench_argmax(vocab_size: int, seed: int, num_steps: int = 2000) -> float:
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal((num_steps, vocab_size)).astype(np.float32)
    for row in logits[:50]:
        int(np.argmax(row))
    start = time.perf_counter()
    for row in logits:
        int(np.argmax(row))
    return (time.perf_counter() - start) * 1e3 / num_steps


HTTP_SCHEMA = {"type": "array", "items": {"type": "integer"}, "minItems": 1000}


def bench_http(args: argparse.Namespace) -> None:
    from bench.common import free_port, launched, load_average
    from bench.serve_bench import Target, bench_level, ours_command, served_model, warm_up

    args.prompt_len, args.num_requests, args.model_dir = 128, 2 * args.concurrency, None
    port = free_port()
    cmd = ours_command(args, port)
    print(
        f"http: {args.concurrency} streams, {args.output_len} output tokens, load {load_average()}"
    )
    with launched(cmd, "/health", port, "nanoserve", 600.0) as url:
        model = served_model(url, None)
        plain = Target("plain", url, None, model=model)
        schema = {"structured_outputs": {"json": HTTP_SCHEMA}}
        constrained = Target("schema", url, None, schema, model=model)
        for target in (plain, constrained):
            warm_up(target, args)
        # Two rounds, alternating; the second counts (the first meets every batch shape for
        # the first time). Each level gets new prompts: no prefix-cache hits from another.
        for round_index in range(2):
            print(f"round {round_index + 1} of 2" + (" (warm-up)" if round_index == 0 else ""))
            levels = []
            for target in (plain, constrained):
                args.seed += 1000
                levels.append(bench_level(target, args, args.concurrency))
    for q in (50, 99):
        a, b = (lv.tpot_ms(q) for lv in levels)
        print(
            f"TPOT p{q}: unconstrained {a:.1f} ms, schema-constrained {b:.1f} ms: {b / a:.2f}x (target <= 1.10x)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--walks", type=int, default=3, help="walks per schema (x batch)")
    parser.add_argument("--max-tokens", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--http", action="store_true", help="TPOT through a launched server")
    parser.add_argument("--concurrency", type=int, default=16, help="--http: streams")
    parser.add_argument("--output-len", type=int, default=128, help="--http: tokens per answer")
    parser.add_argument("--server-args", default="", help="--http: extra `nanoserve serve` flags")
    args = parser.parse_args()
    if args.http:
        bench_http(args)
        return

    print(f"compile ({len(CORPUS)} corpus schemas; the automaton is vocabulary-independent)")
    compile_ms = bench_compile()
    print(
        f"compile p50 {percentile(compile_ms, 50):.2f} ms  max {max(compile_ms):.2f} ms  (targets 20 / 200 ms)"
    )

    tokens, special = default_vocab()
    vocabs = {"default": (tokens, special)}
    vocabs["150k"] = (extended_vocab(tokens, special, QWEN_VOCAB_SIZE, args.seed), special)
    for label, (token_bytes, special_ids) in vocabs.items():
        start = time.perf_counter()
        vocab = VocabIndex(token_bytes, special_ids)
        build_s = time.perf_counter() - start
        argmax_ms = bench_argmax(vocab.vocab_size, args.seed)
        print(
            f"\nvocab {label}: {vocab.vocab_size} tokens, {vocab.num_nodes} trie nodes, index built in {build_s:.2f} s"
        )
        print(
            f"  baseline numpy argmax over {vocab.vocab_size} logits: {argmax_ms * 1e3:.1f} us/step"
        )
        for batch in (1, 16):
            times, misses, hits = bench_masks(vocab, batch, args.walks, args.max_tokens, args.seed)
            p50, p99 = percentile(times, 50), percentile(times, 99)
            print(
                f"  batch {batch:2d}: {len(times)} steps, mask fill per sequence per step p50 {p50 * 1e3:.1f} us"
                f" ({p50 / argmax_ms:.2f}x argmax)  p99 {p99 * 1e3:.1f} us ({p99 / argmax_ms:.2f}x)  max {max(times):.2f} ms;"
                f" mask cache {misses} misses / {hits} hits  (target p99 <= 1 ms)"
            )


if __name__ == "__main__":
    main()
