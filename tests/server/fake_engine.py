"""A scripted stand-in for model.engine.async_engine.AsyncEngine (no model, no torch).

FakeEngine implements server.api.engine_client.EngineClient like AsyncEngine does
(tests/server/api/test_engine_client.py checks both), and refuses what AsyncEngine refuses with
the same checks (model.sampling_params). FakeTokenizer is byte-level: ids 0..255 are bytes, then
a few special tokens. FakeEngine "generates" a fixed reply per choice, one or more tokens per
delta (max_tokens 0: one empty delta; scripted prompt logprobs on each choice's first), and
records what it was asked (calls, aborts), so API handlers can be tested in milliseconds.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from model.errors import EngineError, TemplateError
from model.sampling_params import SamplingParams, check_prompt_ids, resolve_max_tokens
from model.structured import GrammarCompiler, VocabIndex
from model.text.chat_prompt import ChatPrompt, SpecialTokenText, encode_chat_prompt

IM_END, IM_START, BOS = 256, 257, 258
SPECIALS = {IM_END: "<|im_end|>", IM_START: "<|im_start|>", BOS: "<s>"}
VOCAB_SIZE = 300
SPECIAL_TEXT = SpecialTokenText({t: i for i, t in SPECIALS.items()}, rstrip=set(), lstrip=set())


class FakeTokenizer:
    vocab_size = VOCAB_SIZE
    eos_token_ids = {IM_END}
    all_special_ids = set(SPECIALS)
    bos_token = "<s>"
    eos_token = "<|im_end|>"

    def __init__(self) -> None:
        self.template_calls: list[dict[str, Any]] = []

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        ids = [BOS] if add_special_tokens else []
        while text:
            for token_id, special in SPECIALS.items():
                if text.startswith(special):
                    ids.append(token_id)
                    text = text[len(special) :]
                    break
            else:
                ids.extend(text[0].encode())
                text = text[1:]
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        if token_id < 256:
            return bytes([token_id])
        return SPECIALS.get(token_id, "").encode()

    def token_text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        data = b"".join(self.token_bytes(t) for t in ids if not (skip_special_tokens and t >= 256))
        return data.decode("utf-8", errors="replace")

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> ChatPrompt:
        """The real mechanism (model/text/chat_prompt.py) over this toy template."""

        def render(chat: list[dict], chat_tools: list[dict] | None) -> str:
            return self.apply_chat_template(
                chat,
                chat_tools,
                add_generation_prompt,
                continue_final_message,
                **(template_kwargs or {}),
            )

        prompt = encode_chat_prompt(
            render, messages, tools, SPECIAL_TEXT, self.encode, self.encode_as_text
        )
        if add_special_tokens:
            return ChatPrompt(prompt.text, [BOS, *prompt.token_ids])
        return prompt

    def encode_as_text(self, text: str) -> list[int]:
        return list(text.encode())

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        self.template_calls.append(
            {
                "messages": messages,
                "tools": tools,
                "add_generation_prompt": add_generation_prompt,
                "continue_final_message": continue_final_message,
                "extra": extra,
            }
        )
        if extra.get("fail"):
            raise TemplateError("the template raised an exception")
        out = ""
        if tools:
            out += f"<|im_start|>system\nTools: {json.dumps(tools)}<|im_end|>\n"
        for i, message in enumerate(messages):
            out += f"<|im_start|>{message['role']}\n{message['content']}"
            if continue_final_message and i == len(messages) - 1:
                return out
            out += "<|im_end|>\n"
        if add_generation_prompt:
            out += "<|im_start|>assistant\n"
        return out


@dataclass
class FakeDelta:
    choice_index: int
    text: str
    token_ids: list[int]
    logprobs: list[Any] | None
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    prompt_logprobs: list[Any] | None = None


@dataclass
class FakeLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class FakePromptLogprob:
    token_id: int
    logprob: float | None
    rank: int | None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _ChoiceRun:
    index: int
    tokens: list[int]  # what this choice will emit, eos included when it stops
    finish_reason: str
    stop_reason: str | int | None
    pos: int = 0
    pending: bytes = b""
    done: bool = False
    is_first_delta: bool = True  # it carries the prompt logprobs


Reply = str | Callable[[list[int], Any, int], str]


class FakeEngine:
    """Replies `reply` (or reply(prompt_ids, params, choice_index)) to every request."""

    def __init__(self, reply: Reply = "Hello world", max_model_len: int = 256) -> None:
        self.tokenizer = FakeTokenizer()
        self.model_config = SimpleNamespace(vocab_size=VOCAB_SIZE)
        self.max_model_len = max_model_len
        self.reply = reply
        self.tokens_per_delta = 1
        self.num_cached_tokens = 0
        self.raise_on_generate: Exception | None = None  # raised by generate() at once
        self.fail_after_deltas: int | None = None  # EngineError after this many deltas
        self.hold = False  # while True, requests wait (aborts still end them)
        self.calls: list[tuple[str, list[int], Any]] = []
        self.aborted: list[str] = []
        self.closed_early: list[str] = []
        self.running: set[str] = set()
        self._wakers: dict[str, asyncio.Event] = {}
        self._grammar_compiler: GrammarCompiler | None = None

    # ---- the EngineClient interface ---------------------------------------------------------

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[FakeDelta]:
        if self.raise_on_generate is not None:
            raise self.raise_on_generate
        assert params.max_tokens is not None, "the API layer resolves max_tokens"
        assert len(prompt_ids) + params.max_tokens <= self.max_model_len
        # What AsyncEngine.generate checks (LLMEngine.resolve_params), raising RequestRejected.
        check_prompt_ids(prompt_ids, VOCAB_SIZE)
        resolve_max_tokens(
            len(prompt_ids), params.max_tokens, params.min_tokens, self.max_model_len, "prompt"
        )
        params.check_token_ids(VOCAB_SIZE)
        self.calls.append((request_id, list(prompt_ids), params))
        self._wakers[request_id] = asyncio.Event()
        return self._run(request_id, list(prompt_ids), params)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        waker = self._wakers.get(request_id)
        if waker is not None:
            waker.set()

    def grammar_compiler(self) -> GrammarCompiler:
        if self._grammar_compiler is None:
            tokens = [self.tokenizer.token_bytes(i) for i in range(VOCAB_SIZE)]
            self._grammar_compiler = GrammarCompiler(VocabIndex(tokens, set(SPECIALS)))
        return self._grammar_compiler

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(
            num_running=len(self.running),
            num_waiting=0,
            kv_cache_usage=0.25 if self.running else 0.0,
            prefix_cache_hit_ratio=0.5,
            prompt_tokens_total=sum(len(c[1]) for c in self.calls),
            generation_tokens_total=7,
        )

    def release(self) -> None:
        self.hold = False
        for waker in self._wakers.values():
            waker.set()

    # ---- scripted generation ---------------------------------------------------------------

    def _plan(self, prompt_ids: list[int], params: Any, index: int) -> _ChoiceRun:
        text = self.reply(prompt_ids, params, index) if callable(self.reply) else self.reply
        stop_reason: str | None = None
        for stop in params.stop:
            cut = text.find(stop)
            if cut >= 0 and (stop_reason is None or cut < text.find(stop_reason)):
                stop_reason = stop
        if stop_reason is not None:
            cut = text.find(stop_reason)
            text = (
                text[: cut + len(stop_reason)] if params.include_stop_str_in_output else text[:cut]
            )
        tokens = list(text.encode())
        if params.ignore_eos:
            while len(tokens) < params.max_tokens:
                tokens += list((text or "x").encode())
        elif stop_reason is None:
            tokens.append(IM_END)
        if len(tokens) > params.max_tokens or params.ignore_eos:
            return _ChoiceRun(index, tokens[: params.max_tokens], "length", None)
        return _ChoiceRun(index, tokens, "stop", stop_reason)

    def _logprobs(self, tokens: list[int], params: Any) -> list[FakeLogprob] | None:
        if params.logprobs is None:
            return None
        return [
            FakeLogprob(t, -0.25, [((t + k) % 256, -0.25 - k) for k in range(params.logprobs)])
            for t in tokens
        ]

    def _prompt_logprobs(self, prompt_ids: list[int], k: int) -> list[FakePromptLogprob]:
        """Token i scores -0.5 * i, rank 1 + i % 3; its top-k: the next ids, at -0.1 * (j + 1)."""
        first = FakePromptLogprob(prompt_ids[0], None, None)
        return [first] + [
            FakePromptLogprob(
                t, -0.5 * i, 1 + i % 3, [((t + j + 1) % 256, -0.1 * (j + 1)) for j in range(k)]
            )
            for i, t in enumerate(prompt_ids[1:], start=1)
        ]

    def _delta(self, run: _ChoiceRun, prompt_ids, params, text, tokens, finish, stop=None):
        prompt_logprobs = None
        if run.is_first_delta and params.prompt_logprobs is not None:
            prompt_logprobs = self._prompt_logprobs(prompt_ids, params.prompt_logprobs)
        run.is_first_delta = False
        return FakeDelta(
            choice_index=run.index,
            text=text,
            token_ids=tokens,
            logprobs=self._logprobs(tokens, params),
            finish_reason=finish,
            stop_reason=stop,
            num_prompt_tokens=len(prompt_ids),
            num_cached_tokens=self.num_cached_tokens,
            num_output_tokens=run.pos,
            prompt_logprobs=prompt_logprobs,
        )

    async def _run(self, request_id: str, prompt_ids: list[int], params: Any) -> AsyncIterator:
        runs = [self._plan(prompt_ids, params, i) for i in range(params.n)]
        waker = self._wakers[request_id]
        self.running.add(request_id)
        num_deltas = 0
        try:
            while not all(r.done for r in runs):
                await asyncio.sleep(0)
                while self.hold and request_id not in self.aborted:
                    waker.clear()
                    await waker.wait()
                if request_id in self.aborted:
                    for run in runs:
                        if not run.done:
                            run.done = True
                            yield self._delta(run, prompt_ids, params, "", [], "abort")
                    return
                if self.fail_after_deltas is not None and num_deltas >= self.fail_after_deltas:
                    raise EngineError("generation failed: the fake engine was told to fail")
                for run in runs:
                    if run.done:
                        continue
                    tokens = run.tokens[run.pos : run.pos + self.tokens_per_delta]
                    run.pos += len(tokens)
                    data = run.pending + b"".join(bytes([t]) for t in tokens if t < 256)
                    try:
                        text, run.pending = data.decode(), b""
                    except UnicodeDecodeError:  # hold half a character back, like the real one
                        text, run.pending = "", data
                    finish = None
                    if run.pos >= len(run.tokens):
                        run.done = True
                        finish = run.finish_reason
                    stop = run.stop_reason if finish else None
                    num_deltas += 1
                    yield self._delta(run, prompt_ids, params, text, tokens, finish, stop)
        finally:
            self.running.discard(request_id)
            self._wakers.pop(request_id, None)
            if not all(r.done for r in runs):
                self.closed_early.append(request_id)
