"""Engine logprobs -> the OpenAI shapes: chat's `logprobs.content` entries, the legacy
completions' parallel lists (for the completion and, with echo, the prompt), and vLLM's
`prompt_logprobs` dicts. Logprobs are floored at LOGPROB_FLOOR (JSON has no -inf)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.sampling_params import LOGPROB_FLOOR
from server.api.engine_client import PromptLogprob, Tokenizer, TokenLogprobs


def _floor(logprob: float) -> float:
    return logprob if logprob > LOGPROB_FLOOR else LOGPROB_FLOOR


def chat_logprobs(tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs]) -> list[dict[str, Any]]:
    """TokenLogprobs -> entries of OpenAI's `choices[].logprobs.content`."""

    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        return {
            "token": tokenizer.token_text(token_id),
            "logprob": _floor(logprob),
            "bytes": list(tokenizer.token_bytes(token_id)),
        }

    return [
        {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
        for lp in logprobs
    ]


def _legacy_lists() -> dict[str, list[Any]]:
    return {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}


def _legacy_append(
    tokenizer: Tokenizer,
    out: dict[str, list[Any]],
    token_id: int,
    logprob: float | None,
    top: Sequence[tuple[int, float]],
    text_offset: int,
) -> int:
    """One token onto the legacy lists (logprob None: null logprob, null top_logprobs);
    returns the text offset after it."""
    token = tokenizer.token_text(token_id)
    out["tokens"].append(token)
    out["text_offset"].append(text_offset)
    if logprob is None:
        out["token_logprobs"].append(None)
        out["top_logprobs"].append(None)
    else:
        out["token_logprobs"].append(_floor(logprob))
        alternatives = {tokenizer.token_text(t): _floor(v) for t, v in top}
        alternatives.setdefault(token, _floor(logprob))  # the chosen token is always listed
        out["top_logprobs"].append(alternatives)
    return text_offset + len(token)


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs], text_offset: int
) -> tuple[dict[str, Any], int]:
    """TokenLogprobs -> the legacy completions shape; returns it and the next text offset."""
    out = _legacy_lists()
    for lp in logprobs:
        text_offset = _legacy_append(tokenizer, out, lp.token_id, lp.logprob, lp.top, text_offset)
    return out, text_offset


def join_completion_logprobs(parts: Sequence[dict[str, list[Any]]]) -> dict[str, list[Any]]:
    """Legacy parts (the echoed prompt's, then each delta's) -> one set of parallel lists."""
    joined = _legacy_lists()
    for part in parts:
        for key, values in part.items():
            joined[key].extend(values)
    return joined


def echo_logprobs(
    tokenizer: Tokenizer, prompt_logprobs: Sequence[PromptLogprob], k: int
) -> dict[str, Any]:
    """The echoed prompt's part of the legacy shape, offsets from 0, top-k alternatives per
    token; the first token's logprob and top_logprobs are null (nothing precedes it)."""
    out = _legacy_lists()
    text_offset = 0
    for entry in prompt_logprobs:
        text_offset = _legacy_append(
            tokenizer, out, entry.token_id, entry.logprob, entry.top[:k], text_offset
        )
    return out


def vllm_prompt_logprobs(
    tokenizer: Tokenizer, prompt_logprobs: Sequence[PromptLogprob], k: int
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then per token a dict
    {token id: {"logprob", "rank", "decoded_token"}} of the actual token and the top-k."""

    def logprob(token_id: int, value: float, rank: int) -> dict[str, Any]:
        return {
            "logprob": _floor(value),
            "rank": rank,
            "decoded_token": tokenizer.token_text(token_id),
        }

    out: list[dict[str, dict[str, Any]] | None] = []
    for entry in prompt_logprobs:
        if entry.logprob is None or entry.rank is None:
            out.append(None)
            continue
        tokens = {str(entry.token_id): logprob(entry.token_id, entry.logprob, entry.rank)}
        for rank, (token_id, value) in enumerate(entry.top[:k], start=1):
            tokens.setdefault(str(token_id), logprob(token_id, value, rank))
        out.append(tokens)
    return out
