"""POST /v1/responses: OpenAI's Responses API, stateless, on the chat endpoint's machinery.

The request becomes the internal chat request (server/api/responses_request.py), so the
prompt, sampling, structured outputs, tool calls and generation are the chat endpoint's;
`ResponseOutput` shapes the Response object and its typed stream events from the engine
deltas. Streams are `event: <type>` + `data: {..., "type", "sequence_number"}` events from
response.created to response.completed (or .incomplete / .failed), with no `[DONE]` line.
Output items are built once, as the deltas arrive, and the non-streaming body is made from
the same items, so both carry the same text and function calls.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

import orjson

from model.sampling_params import SamplingParams
from server.api.engine_client import EngineClient, GenerationDelta
from server.api.metrics import RequestTracker
from server.api.outputs import Output
from server.api.prompts import chat_prompt, resolve_params
from server.api.responses_request import ResponsesRequest, parse_responses_request
from server.api.structured import compile_structured
from server.api.tool_calls import ToolCall, ToolCallDelta, ToolCallParser
from server.http.errors import HTTPError
from server.http.messages import Request, Response
from server.http.sse import EventSourceResponse, TypedEventSourceResponse


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}


@dataclass
class _Item:
    """One output item: a message (call None) or a function call."""

    id: str
    index: int  # in the response's output
    call: ToolCall | None = None
    text: str = ""
    status: str = "in_progress"  # then "completed" or "incomplete"

    def to_dict(self) -> dict[str, Any]:
        """A fresh dict (events queue before they are written; the item changes on)."""
        is_open = self.status == "in_progress"
        if self.call is None:
            return {
                "type": "message",
                "id": self.id,
                "status": self.status,
                "role": "assistant",
                "content": [] if is_open else [_text_part(self.text)],
            }
        return {
            "type": "function_call",
            "id": self.id,
            "call_id": self.call.id,
            "name": self.call.name,
            "arguments": "" if is_open else self.call.arguments,
            "status": self.status,
        }


class ResponseOutput(Output):
    """One response's output items, its stream events and its Response object (n is 1)."""

    event_source = TypedEventSourceResponse

    def __init__(
        self,
        req: ResponsesRequest,
        meta: dict[str, Any],
        prompt_len: int,
        tracker: RequestTracker,
    ) -> None:
        super().__init__(1, False, meta, [prompt_len], tracker)
        self.echo = req.echo
        chat = req.chat
        if chat.parses_tool_calls:
            max_calls = None if chat.parallel_tool_calls else 1
            self.choices[0].parser = ToolCallParser(chat.tool_names, max_calls)
        self.items: list[_Item] = []
        self._message: _Item | None = None  # the message item text goes to, while open
        self._calls: dict[int, _Item] = {}  # function-call items by the parser's call index
        self.status = "in_progress"
        self._num_events = 0

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self._num_events, **fields}
        self._num_events += 1
        return event

    def first_chunks(self) -> list[dict[str, Any]]:
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def stream_error(self, exc: HTTPError) -> dict[str, Any]:
        """The stream's `error` event, from the error body's {"message", "type", "param", "code"}."""
        error = orjson.loads(exc.body())["error"]
        code = error.get("code") or error.get("type")
        return self._event(
            "error", code=str(code), message=error.get("message"), param=error.get("param")
        )

    def stream_end(self) -> list[dict[str, Any]]:
        return []  # response.completed (or .incomplete), the last event, came with the final delta

    def _open_item(self, call: ToolCall | None) -> tuple[_Item, dict[str, Any]]:
        """A new output item, and the fields its events locate it by."""
        prefix = "msg" if call is None else "fc"
        item = _Item(f"{prefix}_{uuid.uuid4().hex}", len(self.items), call)
        self.items.append(item)
        return item, {"item_id": item.id, "output_index": item.index}

    def _added(self, item: _Item) -> dict[str, Any]:
        return self._event(
            "response.output_item.added", output_index=item.index, item=item.to_dict()
        )

    def _done(self, item: _Item) -> dict[str, Any]:
        return self._event(
            "response.output_item.done", output_index=item.index, item=item.to_dict()
        )

    def _add_text(self, text: str) -> list[dict[str, Any]]:
        """Text for the open message item (opened first when there is none)."""
        events = []
        if self._message is None:
            self._message, where = self._open_item(None)
            events.append(self._added(self._message))
            events.append(
                self._event(
                    "response.content_part.added", **where, content_index=0, part=_text_part("")
                )
            )
        item = self._message
        if text:
            item.text += text
            events.append(
                self._event(
                    "response.output_text.delta",
                    item_id=item.id,
                    output_index=item.index,
                    content_index=0,
                    delta=text,
                    logprobs=[],
                )
            )
        return events

    def _close_message(self, status: str) -> list[dict[str, Any]]:
        item = self._message
        if item is None:
            return []
        self._message = None
        item.status = status
        where = {"item_id": item.id, "output_index": item.index, "content_index": 0}
        return [
            self._event("response.output_text.done", **where, text=item.text, logprobs=[]),
            self._event("response.content_part.done", **where, part=_text_part(item.text)),
            self._done(item),
        ]

    def _add_call_piece(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        """A piece of a function call: its item opens with the first, its arguments stream as
        deltas, the last piece closes it."""
        events = []
        if piece.is_first:
            events += self._close_message("completed")
            item, _ = self._open_item(piece.call)
            self._calls[piece.index] = item
            events.append(self._added(item))
        item = self._calls[piece.index]
        where = {"item_id": item.id, "output_index": item.index}
        if piece.arguments:
            events.append(
                self._event(
                    "response.function_call_arguments.delta", **where, delta=piece.arguments
                )
            )
        if piece.is_last:
            call = piece.call
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    **where,
                    name=call.name,
                    arguments=call.arguments,
                )
            )
            item.status = "completed"
            events.append(self._done(item))
        return events

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        choice = self._track(prompt_index, delta)
        events = []
        for piece in self._parse(choice, delta):
            if isinstance(piece, str):
                events += self._add_text(piece) if piece else []
            else:
                events += self._add_call_piece(piece)
        if delta.finish_reason is None:
            return events
        reason = delta.finish_reason
        if choice.tool_calls and reason == "stop":
            reason = "tool_calls"
        self._finish(choice, reason, delta.stop_reason)
        self.status = {"length": "incomplete", "abort": "failed"}.get(reason, "completed")
        if not self.items:  # nothing was written: the answer is one empty message
            events += self._add_text("")
        events += self._close_message("incomplete" if reason == "length" else "completed")
        events.append(self._event(f"response.{self.status}", response=self.response()))
        return events

    def response(self) -> dict[str, Any]:
        is_done = self.status != "in_progress"
        error = None
        if self.status == "failed":
            error = {"code": "server_error", "message": "The request was aborted by the server."}
        incomplete = {"reason": "max_output_tokens"} if self.status == "incomplete" else None
        return {
            "id": self.meta["id"],
            "object": "response",
            "created_at": self.meta["created_at"],
            "status": self.status,
            "error": error,
            "incomplete_details": incomplete,
            "model": self.meta["model"],
            "output": [item.to_dict() for item in self.items] if is_done else [],
            "usage": self.response_usage() if is_done else None,
            "store": False,
            "background": False,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "truncation": "disabled",
            **self.echo,
        }

    def response_usage(self) -> dict[str, Any]:
        input_tokens = self.prompt_lens[0]
        output_tokens = self.choices[0].num_output_tokens
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": self.cached[0], "cache_write_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }


class ChatHandlers(Protocol):
    """What this endpoint shares of server.api.handlers.OpenAIAPI (typed here: handlers
    imports this module to route it)."""

    state: Any  # its APIState: .metrics, .retry_after_s

    def _engine(self, request: Request) -> EngineClient: ...

    def _model(self, requested: str | None) -> str: ...

    async def _run(
        self,
        request: Request,
        engine: EngineClient,
        output: Output,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        stream: bool,
    ) -> Response | EventSourceResponse: ...


def response_id(request: Request) -> str:
    """`resp_<request id>_<random>`: the HTTP request id (the access log's) plus a random part,
    since a client's X-Request-Id may repeat and the engine refuses a running duplicate."""
    return f"resp_{request.request_id}_{uuid.uuid4().hex[:12]}"


class ResponsesAPI:
    def __init__(self, api: ChatHandlers) -> None:
        self.api = api

    async def create(self, request: Request) -> Response | EventSourceResponse:
        api = self.api
        tracker = api.state.metrics.tracker()
        engine = api._engine(request)
        req = parse_responses_request(request.json())
        model = api._model(req.chat.model)
        prompt_ids = chat_prompt(engine.tokenizer, req.chat)
        sampling = await compile_structured(engine, req.chat.sampling, req.chat.structured)
        params = resolve_params(engine, [prompt_ids], sampling, "input")
        request_id = response_id(request)
        meta = {"id": request_id, "created_at": int(time.time()), "model": model}
        output = ResponseOutput(req, meta, len(prompt_ids), tracker)
        stream = req.chat.stream
        return await api._run(request, engine, output, request_id, [prompt_ids], params, stream)
