"""Engine token logprobs -> the two OpenAI shapes: chat's `logprobs.content` entries and the
legacy completions' parallel lists. Logprobs are floored at LOGPROB_FLOOR (JSON has no -inf)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from model.sampling_params import LOGPROB_FLOOR
from server.api.engine_client import Tokenizer, TokenLogprobs


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


def completion_logprobs(
    tokenizer: Tokenizer, logprobs: Sequence[TokenLogprobs], text_offset: int
) -> tuple[dict[str, Any], int]:
    """TokenLogprobs -> the legacy completions shape; returns it and the next text offset."""
    out: dict[str, Any] = {
        "tokens": [],
        "token_logprobs": [],
        "top_logprobs": [],
        "text_offset": [],
    }
    for lp in logprobs:
        token = tokenizer.token_text(lp.token_id)
        out["tokens"].append(token)
        out["token_logprobs"].append(_floor(lp.logprob))
        top = {tokenizer.token_text(t): _floor(v) for t, v in lp.top}
        top.setdefault(token, _floor(lp.logprob))  # the chosen token is always listed
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out, text_offset
