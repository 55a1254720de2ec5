"""`EngineClient`: exactly what the API layer uses of the engine, as a typing.Protocol.

model.engine.async_engine.AsyncEngine is the implementation (server/serve.py hands it over),
tests/server/fake_engine.py's FakeEngine the scripted one; tests/server/api/test_engine_client.py
checks both against this file member by member, signatures included. The API layer may not
import model.engine (tests/test_layout.py), so the engine's deltas and stats appear here as the
attributes read of them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any, Protocol

from model.sampling_params import SamplingParams
from model.structured import GrammarCompiler


class Tokenizer(Protocol):
    """The tokenizer methods the handlers and outputs call (model.text.tokenizer.Tokenizer)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...

    def token_text(self, token_id: int) -> str: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> ChatPrompt:
        """The rendered chat and its ids, client text never as control tokens.

        Raises model.errors.TemplateError when the template fails."""
        ...


class ChatPrompt(Protocol):
    text: str
    token_ids: list[int]


class ModelConfig(Protocol):
    vocab_size: int


class TokenLogprobs(Protocol):
    token_id: int
    logprob: float
    top: Sequence[tuple[int, float]]  # (token id, logprob) alternatives, best first


class PromptLogprob(Protocol):
    """One scored prompt token (model.engine.outputs.PromptLogprob)."""

    token_id: int
    logprob: float | None  # None for the first prompt token
    rank: int | None  # 1 = the most likely token
    top: Sequence[tuple[int, float]]  # (token id, logprob) alternatives, best first


class GenerationDelta(Protocol):
    """New output of one choice (model.engine.outputs.GenerationDelta)."""

    choice_index: int
    text: str
    token_ids: list[int]
    logprobs: Sequence[TokenLogprobs] | None
    finish_reason: str | None  # None while running; "stop" | "length" | "abort"
    stop_reason: str | int | None
    num_cached_tokens: int
    num_output_tokens: int
    # On a choice's first delta when SamplingParams.prompt_logprobs asked: one per prompt token.
    prompt_logprobs: Sequence[PromptLogprob] | None


class EngineStats(Protocol):
    """The gauges and totals /metrics reads (model.engine.outputs.EngineStats)."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_hit_ratio: float
    prompt_tokens_total: int
    generation_tokens_total: int


class EngineClient(Protocol):
    tokenizer: Tokenizer
    model_config: ModelConfig
    max_model_len: int

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of every choice until all finish. Raises model.errors.RequestRejected or
        QueueFull at once; the iterator raises EngineError if a step fails for this request.
        Closing it early aborts the request."""
        ...

    def abort(self, request_id: str) -> None:
        """Idempotent; the request ends with finish_reason "abort"."""
        ...

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler over this model's vocabulary (masks as wide as the
        logits). Thread-safe and slow on first call: call it off the event loop. Its grammars
        go to the engine in SamplingParams.structured."""
        ...

    def stats(self) -> EngineStats: ...
