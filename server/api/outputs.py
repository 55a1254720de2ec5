"""Engine deltas -> OpenAI response bodies and stream chunks (chat and legacy completions).

One `Output` object per request accumulates every choice; the non-streaming body is built
from the same state the stream chunks came from, so both carry the same text and tool calls.
Logprob shapes are in server/api/logprobs.py, tool-call parsing in server/api/tool_calls.py.
A choice's first delta carries its prompt logprobs when the request asked: completions put
vLLM's `prompt_logprobs` in each choice and, with echo and logprobs, the prompt's tokens ahead
of the completion's in `logprobs` (streamed: in the first chunk, with the echoed text); chat
puts vLLM's `prompt_logprobs` on the response, as vLLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from server.api.engine_client import GenerationDelta, Tokenizer
from server.api.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echo_logprobs,
    join_completion_logprobs,
    vllm_prompt_logprobs,
)
from server.api.metrics import RequestTracker
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.tool_calls import (
    ParserEvent,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
    tool_call_deltas,
)
from server.http.errors import HTTPError
from server.http.sse import EventSourceResponse


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
    """Shared bookkeeping: choices, usage, metrics. Subclasses shape the JSON, and the stream:
    its response class (how items become SSE frames), its in-stream error and its end."""

    chunk_object = ""
    event_source: type[EventSourceResponse] = EventSourceResponse

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

    def stream_error(self, exc: HTTPError) -> Any:
        """The stream item a failure after the headers becomes: OpenAI's error body."""
        return exc.body()

    def stream_end(self) -> list[Any]:
        """The items that close a stream: OpenAI's `data: [DONE]`."""
        return ["[DONE]"]

    def _parse(self, choice: _Choice, delta: GenerationDelta) -> list[ParserEvent]:
        """The delta's text as content and tool-call pieces (all content when the request
        parses no tool calls); calls the pieces start are added to the choice."""
        if choice.parser is None:
            return [delta.text]
        events = choice.parser.push_events(delta.text)
        if delta.finish_reason is not None:
            events += choice.parser.finish_events()
        choice.tool_calls.extend(
            e.call for e in events if isinstance(e, ToolCallDelta) and e.is_first
        )
        return events

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
        self.prompt_logprobs_k = req.prompt_logprobs
        self.prompt_logprobs: list[Any] | None = None
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
        if delta.prompt_logprobs is not None and self.prompt_logprobs_k is not None:
            self.prompt_logprobs = vllm_prompt_logprobs(
                self.tokenizer, delta.prompt_logprobs, self.prompt_logprobs_k
            )
        events = self._parse(choice, delta)
        text = "".join(e for e in events if isinstance(e, str))
        pieces = [e for e in events if isinstance(e, ToolCallDelta)]
        choice.parts.append(text)
        entries = None
        if self.wants_logprobs and delta.logprobs:
            entries = chat_logprobs(self.tokenizer, delta.logprobs)
            choice.logprobs.extend(entries)
        chunks = []
        if text or pieces or entries:
            # one chunk: content (text before a call comes first in the stream, as
            # clients concatenate content and calls separately), then the call pieces
            body: dict[str, Any] = {}
            if text:
                body["content"] = text
            if pieces:
                body["tool_calls"] = tool_call_deltas(pieces)
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
        body = {**self.meta, "object": "chat.completion", "choices": choices, "usage": self.usage()}
        if self.prompt_logprobs_k is not None:
            body["prompt_logprobs"] = self.prompt_logprobs
        return body


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
        self.num_logprobs = req.sampling.logprobs  # None: no logprobs
        self.echo_logprobs = req.echo_logprobs
        self.prompt_logprobs_k = req.prompt_logprobs
        self.prompt_logprobs: dict[int, list[Any]] = {}  # choice index -> vLLM's shape
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
        if self.echo_logprobs:  # the echo goes out with its logprobs, on the first delta
            return []
        return [
            self._chunk_choice(c.index, self._echo(c.index))
            for c in self.choices
            if self.echo_texts
        ]

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        choice = self._track(prompt_index, delta)
        choice.parts.append(delta.text)
        text = delta.text
        parts: list[dict[str, list[Any]]] = []
        if delta.prompt_logprobs is not None:
            if self.echo_logprobs:
                assert self.num_logprobs is not None
                text = self._echo(choice.index) + text
                parts.append(
                    echo_logprobs(self.tokenizer, delta.prompt_logprobs, self.num_logprobs)
                )
            if self.prompt_logprobs_k is not None:
                self.prompt_logprobs[choice.index] = vllm_prompt_logprobs(
                    self.tokenizer, delta.prompt_logprobs, self.prompt_logprobs_k
                )
        if self.num_logprobs is not None and delta.logprobs:
            completion, choice.text_offset = completion_logprobs(
                self.tokenizer, delta.logprobs, choice.text_offset
            )
            parts.append(completion)
        choice.logprobs.extend(parts)
        chunks = []
        if text or parts:
            logprobs = join_completion_logprobs(parts) if parts else None
            chunks.append(self._chunk_choice(choice.index, text, logprobs))
        if delta.finish_reason is not None:
            self._finish(choice, delta.finish_reason, delta.stop_reason)
            chunks.append(
                self._chunk_choice(choice.index, "", None, delta.finish_reason, delta.stop_reason)
            )
        return chunks

    def response(self) -> dict[str, Any]:
        choices = []
        for c in self.choices:
            choice = {
                "index": c.index,
                "text": self._echo(c.index) + "".join(c.parts),
                "logprobs": join_completion_logprobs(c.logprobs)
                if self.num_logprobs is not None
                else None,
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            }
            if self.prompt_logprobs_k is not None:
                choice["prompt_logprobs"] = self.prompt_logprobs.get(c.index)
            choices.append(choice)
        return {**self.meta, "object": "text_completion", "choices": choices, "usage": self.usage()}
