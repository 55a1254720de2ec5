"""Engine deltas -> OpenAI response bodies and stream chunks (chat and legacy completions).

One `Output` object per request accumulates every choice; the non-streaming body is built
from the same state the stream chunks came from, so both carry the same text and tool calls.
Logprob shapes are in server/api/logprobs.py, tool-call parsing in server/api/tool_calls.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.api.engine_client import GenerationDelta, Tokenizer
from server.api.logprobs import chat_logprobs, completion_logprobs
from server.api.metrics import RequestTracker
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.tool_calls import ToolCall, ToolCallParser


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


@dataclass
class _Choice:
    index: int
    parser: ToolCallParser | None = None
    parts: list[str] = field(default_factory=list)
    tool_calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[Any] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    num_output_tokens: int = 0
    text_offset: int = 0


class Output:
    """Shared bookkeeping: choices, usage, metrics. Subclasses shape the JSON."""

    chunk_object = ""

    def __init__(
        self,
        n: int,
        include_usage: bool,
        meta: dict[str, Any],
        prompt_lens: list[int],
        tracker: RequestTracker,
    ) -> None:
        self.n = n
        self.include_usage = include_usage
        self.meta = meta  # id, created, model, system_fingerprint
        self.prompt_lens = prompt_lens
        self.cached = [0] * len(prompt_lens)
        self.tracker = tracker
        self.choices = [_Choice(i) for i in range(len(prompt_lens) * n)]
        self._num_unfinished = len(self.choices)
        self._failed = False

    def chunk(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        body = {**self.meta, "object": self.chunk_object, "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def _track(self, prompt_index: int, delta: GenerationDelta) -> _Choice:
        choice = self.choices[prompt_index * self.n + delta.choice_index]
        assert choice.finish_reason is None, "a delta after the choice finished"
        self.cached[prompt_index] = max(self.cached[prompt_index], delta.num_cached_tokens)
        choice.num_output_tokens = delta.num_output_tokens
        self.tracker.on_tokens(choice.index, len(delta.token_ids))
        return choice

    def _finish(self, choice: _Choice, reason: str, stop_reason: str | int | None) -> None:
        choice.finish_reason = reason
        choice.stop_reason = stop_reason
        self.tracker.on_choice_finished(reason)
        self._num_unfinished -= 1
        if self._num_unfinished == 0:
            self.tracker.on_request_finished()

    def on_error(self) -> None:
        if not self._failed:
            self._failed = True
            self.tracker.on_choice_finished("error")
            self.tracker.on_request_finished()

    def on_closed(self) -> None:
        """The request ended; choices still open were dropped (client gone, shutdown)."""
        if not self._failed:
            for choice in self.choices:
                if choice.finish_reason is None:
                    self._finish(choice, "abort", None)

    @property
    def was_aborted(self) -> bool:
        return any(c.finish_reason == "abort" for c in self.choices)

    def usage(self) -> dict[str, Any]:
        completion = sum(c.num_output_tokens for c in self.choices)
        return usage_dict(sum(self.prompt_lens), completion, sum(self.cached))

    def usage_chunk(self) -> dict[str, Any] | None:
        if not self.include_usage:
            return None
        return {**self.meta, "object": self.chunk_object, "choices": [], "usage": self.usage()}

    def first_chunks(self) -> list[dict[str, Any]]:
        return []

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        raise NotImplementedError

    def response(self) -> dict[str, Any]:
        raise NotImplementedError


class ChatOutput(Output):
    chunk_object = "chat.completion.chunk"

    def __init__(
        self,
        req: ChatCompletionRequest,
        tokenizer: Tokenizer,
        meta: dict[str, Any],
        prompt_lens: list[int],
        tracker: RequestTracker,
    ) -> None:
        super().__init__(req.sampling.n, req.include_usage, meta, prompt_lens, tracker)
        self.tokenizer = tokenizer
        self.wants_logprobs = req.logprobs
        if req.parses_tool_calls:
            names = req.tool_names
            max_calls = None if req.parallel_tool_calls else 1
            for choice in self.choices:
                choice.parser = ToolCallParser(names, max_calls)

    def _chunk_choice(self, index: int, delta: dict, logprobs=None, finish=None, stop=None) -> dict:
        entry = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            entry["stop_reason"] = stop
        return self.chunk([entry])

    def first_chunks(self) -> list[dict[str, Any]]:
        role = {"role": "assistant", "content": ""}
        return [self._chunk_choice(c.index, role) for c in self.choices]

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        choice = self._track(prompt_index, delta)
        text, calls = delta.text, []
        if choice.parser is not None:
            text, calls = choice.parser.push(text)
            if delta.finish_reason is not None:
                rest, more = choice.parser.finish()
                text += rest
                calls += more
        first_call = len(choice.tool_calls)
        choice.parts.append(text)
        choice.tool_calls.extend(calls)
        entries = None
        if self.wants_logprobs and delta.logprobs:
            entries = chat_logprobs(self.tokenizer, delta.logprobs)
            choice.logprobs.extend(entries)
        chunks = []
        if text or calls or entries:
            body: dict[str, Any] = {}
            if text:
                body["content"] = text
            if calls:
                body["tool_calls"] = [c.to_delta(first_call + k) for k, c in enumerate(calls)]
            lp = {"content": entries, "refusal": None} if entries else None
            chunks.append(self._chunk_choice(choice.index, body, lp))
        if delta.finish_reason is not None:
            reason = delta.finish_reason
            if choice.tool_calls and reason == "stop":
                reason = "tool_calls"
            self._finish(choice, reason, delta.stop_reason)
            chunks.append(self._chunk_choice(choice.index, {}, None, reason, delta.stop_reason))
        return chunks

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            content: str | None = "".join(c.parts)
            if c.tool_calls and not content.strip():
                content = None
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if c.tool_calls:
                message["tool_calls"] = [t.to_dict() for t in c.tool_calls]
            logprobs = {"content": c.logprobs, "refusal": None} if self.wants_logprobs else None
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return {**self.meta, "object": "chat.completion", "choices": choices, "usage": self.usage()}


class CompletionOutput(Output):
    chunk_object = "text_completion"

    def __init__(
        self,
        req: CompletionRequest,
        tokenizer: Tokenizer,
        meta: dict[str, Any],
        prompt_lens: list[int],
        tracker: RequestTracker,
        echo_texts: list[str],
    ) -> None:
        super().__init__(req.sampling.n, req.include_usage, meta, prompt_lens, tracker)
        self.tokenizer = tokenizer
        self.wants_logprobs = req.sampling.logprobs is not None
        self.echo_texts = echo_texts  # per prompt; empty without echo
        for c in self.choices:
            c.text_offset = len(self._echo(c.index))

    def _echo(self, index: int) -> str:
        return self.echo_texts[index // self.n] if self.echo_texts else ""

    def _chunk_choice(self, index: int, text: str, logprobs=None, finish=None, stop=None) -> dict:
        entry = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if finish is not None:
            entry["stop_reason"] = stop
        return self.chunk([entry])

    def first_chunks(self) -> list[dict[str, Any]]:
        return [
            self._chunk_choice(c.index, self._echo(c.index))
            for c in self.choices
            if self.echo_texts
        ]

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        choice = self._track(prompt_index, delta)
        choice.parts.append(delta.text)
        logprobs = None
        if self.wants_logprobs and delta.logprobs:
            logprobs, choice.text_offset = completion_logprobs(
                self.tokenizer, delta.logprobs, choice.text_offset
            )
            choice.logprobs.append(logprobs)
        chunks = []
        if delta.text or logprobs:
            chunks.append(self._chunk_choice(choice.index, delta.text, logprobs))
        if delta.finish_reason is not None:
            self._finish(choice, delta.finish_reason, delta.stop_reason)
            chunks.append(
                self._chunk_choice(choice.index, "", None, delta.finish_reason, delta.stop_reason)
            )
        return chunks

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            logprobs = None
            if self.wants_logprobs:
                logprobs = {
                    "tokens": [],
                    "token_logprobs": [],
                    "top_logprobs": [],
                    "text_offset": [],
                }
                for part in c.logprobs:
                    for key, values in part.items():
                        logprobs[key].extend(values)
            choices.append(
                {
                    "index": c.index,
                    "text": self._echo(c.index) + "".join(c.parts),
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
        return {**self.meta, "object": "text_completion", "choices": choices, "usage": self.usage()}
