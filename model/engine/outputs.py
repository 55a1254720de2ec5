"""The engine's plain data types: the deltas it returns, prompt logprobs, and its stats (its
config: config.py).

Kept apart from LLMEngine so that callers (the async facade, the server, benchmarks) can name
these without reading the step loop.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from model.sample.metadata import TokenLogprobs


@dataclass
class PromptLogprob:
    """Scoring one prompt token: its logprob given the tokens before it, from the raw logits."""

    token_id: int
    logprob: float | None  # None for the first prompt token: nothing precedes it
    rank: int | None  # 1 + the number of tokens more likely than this one; None with logprob
    top: list[tuple[int, float]]  # top-k alternatives, most likely first


@dataclass
class GenerationDelta:
    choice_index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None  # None | "stop" | "length" | "abort"
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    # The first delta of a choice that asked for prompt logprobs: one entry per prompt token.
    prompt_logprobs: list[PromptLogprob] | None = None


@dataclass
class EngineStats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_ratio: float = 0.0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    num_preemptions_total: int = 0
    num_blocks: int = 0
    num_free_blocks: int = 0


# What LLMEngine.step() returns per item: (request id, its delta or the error that failed it).
Output = tuple[str, "GenerationDelta | Exception"]


def merge_deltas(deltas: list[GenerationDelta]) -> list[GenerationDelta]:
    """Joins the deltas of each choice (a slow reader gets fewer, larger ones; none is lost)."""
    merged: dict[int, GenerationDelta] = {}
    for d in deltas:
        last = merged.get(d.choice_index)
        if last is None:
            merged[d.choice_index] = d
            continue
        assert last.finish_reason is None, "no delta follows a finished choice"
        logprobs = None
        if last.logprobs is not None or d.logprobs is not None:
            logprobs = (last.logprobs or []) + (d.logprobs or [])
        merged[d.choice_index] = replace(
            d,
            text=last.text + d.text,
            token_ids=last.token_ids + d.token_ids,
            logprobs=logprobs,
            prompt_logprobs=last.prompt_logprobs or d.prompt_logprobs,
        )
    return list(merged.values())
