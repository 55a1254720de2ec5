"""The Anthropic Messages API: POST /v1/messages and POST /v1/messages/count_tokens.

A Messages body is parsed into the chat endpoint's request (server/api/anthropic_protocol.py),
so prompt rendering, sampling, forced tool calls, generation, disconnects, limits and metrics
are the chat path's own (OpenAIAPI._run in server/api/handlers.py). What differs is shaped
here: `MessageOutput` turns engine deltas into the message object and its named stream events
(message_start, content_block_start / _delta / _stop, message_delta, message_stop, ping;
`MessageEvents` writes them with `event:` lines and no "[DONE]"), and every error, the HTTP
layer's own (401, 413, 404, bad framing) included through the router's error format, is
`{"type": "error", "error": {"type", "message"}}` with the status the OpenAI endpoints use.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson

from server.api.anthropic_protocol import parse_messages_request
from server.api.engine_client import GenerationDelta
from server.api.metrics import RequestTracker
from server.api.outputs import Output
from server.api.prompts import chat_prompt, resolve_params
from server.api.protocol import ChatCompletionRequest
from server.api.structured import compile_structured
from server.api.tool_calls import (
    TOOL_CALL_END,
    TOOL_CALL_START,
    ToolCall,
    ToolCallDelta,
    ToolCallParser,
)
from server.http.errors import HTTPError, default_error_type
from server.http.messages import JSONResponse, Request, Response
from server.http.routing import Router
from server.http.sse import EventSourceResponse, TypedEventSourceResponse, encode_named_event

PATH = "/v1/messages"

# The error `type` of server/http/errors.py (OpenAI's) -> Anthropic's.
_ERROR_TYPES = {
    "invalid_request_error": "invalid_request_error",
    "authentication_error": "authentication_error",
    "permission_error": "permission_error",
    "not_found_error": "not_found_error",
    "rate_limit_error": "rate_limit_error",
    "server_error": "api_error",
    "service_unavailable": "overloaded_error",
}


def error_payload(openai_type: str | None, message: str) -> dict[str, Any]:
    kind = _ERROR_TYPES.get(openai_type or "", "api_error")
    return {"type": "error", "error": {"type": kind, "message": message}}


class AnthropicError(HTTPError):
    """An HTTPError whose body is in Anthropic's shape (status and headers unchanged)."""

    def payload(self) -> dict[str, Any]:
        return error_payload(self.type or default_error_type(self.status), self.message)

    def body(self) -> bytes:
        return orjson.dumps(self.payload())


def anthropic_error(exc: HTTPError) -> AnthropicError:
    """`exc` in Anthropic's shape; the router's error format for /v1/messages paths."""
    if isinstance(exc, AnthropicError):
        return exc
    return AnthropicError(
        exc.status, exc.message, type=exc.type, param=exc.param, code=exc.code, headers=exc.headers
    )


class MessageEvents(TypedEventSourceResponse):
    """Anthropic's event stream: each event is named by its `type` ("event: <type>" before
    its data), keep-alives are `ping` events, and it ends with message_stop (MessageOutput's
    events, its in-stream error an `error` event)."""

    ping_frame = encode_named_event("ping", {"type": "ping"})

    def error_frame(self, exc: BaseException) -> bytes:
        if isinstance(exc, HTTPError):
            payload = anthropic_error(exc).payload()
        else:
            payload = error_payload("server_error", "Internal server error")
        return encode_named_event("error", payload)


def _tool_input(call: ToolCall) -> dict[str, Any] | None:
    """The call's arguments as the object a tool_use block holds; None when they are not one."""
    try:
        value = json.loads(call.arguments)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


class MessageOutput(Output):
    """One message: its content blocks, stop reason and usage, and the stream events that
    built them (the non-streaming body is made from the same blocks)."""

    event_source = MessageEvents

    def __init__(
        self,
        req: ChatCompletionRequest,
        meta: dict[str, Any],
        num_prompt_tokens: int,
        tracker: RequestTracker,
    ) -> None:
        super().__init__(1, False, meta, [num_prompt_tokens], tracker)
        if req.parses_tool_calls:
            max_calls = None if req.parallel_tool_calls else 1
            self.choices[0].parser = ToolCallParser(req.tool_names, max_calls)
        self.blocks: list[dict[str, Any]] = []
        self._text_parts: list[str] | None = None  # the open text block's text so far
        self._tool_blocks: dict[int, int] = {}  # the parser's call index -> block index
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None

    def _usage(self) -> dict[str, int]:
        num_output = self.choices[0].num_output_tokens
        return {"input_tokens": self.prompt_lens[0], "output_tokens": num_output}

    def _message(self, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.meta["id"],
            "type": "message",
            "role": "assistant",
            "model": self.meta["model"],
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": self._usage(),
        }

    def first_chunks(self) -> list[dict[str, Any]]:
        return [{"type": "message_start", "message": self._message([])}, {"type": "ping"}]

    def stream_error(self, exc: HTTPError) -> dict[str, Any]:
        return anthropic_error(exc).payload()

    def stream_end(self) -> list[dict[str, Any]]:
        return []  # message_stop, the last event, came with the final delta

    def _add_text(self, text: str) -> list[dict[str, Any]]:
        events = []
        if self._text_parts is None:
            self._text_parts = []
            self.blocks.append({"type": "text", "text": ""})
            events.append(
                {
                    "type": "content_block_start",
                    "index": len(self.blocks) - 1,
                    "content_block": {"type": "text", "text": ""},
                }
            )
        self._text_parts.append(text)
        delta = {"type": "text_delta", "text": text}
        events.append(
            {"type": "content_block_delta", "index": len(self.blocks) - 1, "delta": delta}
        )
        return events

    def _close_block(self) -> list[dict[str, Any]]:
        if self._text_parts is None:
            return []
        self.blocks[-1]["text"] = "".join(self._text_parts)
        self._text_parts = None
        return [{"type": "content_block_stop", "index": len(self.blocks) - 1}]

    def _add_tool_use_piece(self, piece: ToolCallDelta) -> list[dict[str, Any]]:
        """A piece of a tool call: its tool_use block starts with the first, the arguments
        stream as input_json_delta, the last piece stops the block and sets its `input` (an
        empty object when the model's arguments are not a JSON object)."""
        events = []
        call = piece.call
        if piece.is_first and piece.is_last and _tool_input(call) is None:
            # a whole call (it did not stream) whose arguments are no object stays text
            raw = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
            return self._add_text(f"{TOOL_CALL_START}{raw}{TOOL_CALL_END}")
        if piece.is_first:
            events += self._close_block()
            block_id = f"toolu_{call.id.removeprefix('call_')}"
            self.blocks.append({"type": "tool_use", "id": block_id, "name": call.name, "input": {}})
            self._tool_blocks[piece.index] = len(self.blocks) - 1
            events.append(
                {
                    "type": "content_block_start",
                    "index": len(self.blocks) - 1,
                    "content_block": {**self.blocks[-1], "input": {}},
                }
            )
        index = self._tool_blocks[piece.index]
        if piece.arguments:
            delta = {"type": "input_json_delta", "partial_json": piece.arguments}
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        if piece.is_last:
            self.blocks[index]["input"] = _tool_input(call) or {}
            events.append({"type": "content_block_stop", "index": index})
        return events

    def on_delta(self, prompt_index: int, delta: GenerationDelta) -> list[dict[str, Any]]:
        choice = self._track(prompt_index, delta)
        events = []
        for piece in self._parse(choice, delta):
            if isinstance(piece, str):
                events += self._add_text(piece) if piece else []
            else:
                events += self._add_tool_use_piece(piece)
        if delta.finish_reason is None:
            return events
        events += self._close_block()
        if delta.finish_reason == "abort":
            self._finish(choice, "abort", None)
            message = "The request was aborted by the server."
            return [*events, error_payload("service_unavailable", message)]
        reason = self._stop(delta)
        self._finish(choice, reason, delta.stop_reason)
        events.append(
            {
                "type": "message_delta",
                "delta": {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence},
                "usage": {"output_tokens": choice.num_output_tokens},
            }
        )
        events.append({"type": "message_stop"})
        return events

    def _stop(self, delta: GenerationDelta) -> str:
        """Sets the Anthropic stop reason; returns the chat one (for the metrics)."""
        if delta.finish_reason == "length":
            self.stop_reason = "max_tokens"
            return "length"
        if any(block["type"] == "tool_use" for block in self.blocks):
            self.stop_reason = "tool_use"
            return "tool_calls"
        if isinstance(delta.stop_reason, str):  # a stop sequence (ints are stop tokens)
            self.stop_reason, self.stop_sequence = "stop_sequence", delta.stop_reason
        else:
            self.stop_reason = "end_turn"
        return "stop"

    def response(self) -> dict[str, Any]:
        self._close_block()
        return self._message(self.blocks)


RequestIds = Callable[[str, Request], str]


class AnthropicAPI:
    """The two endpoints, on the chat machinery of an OpenAIAPI (server/api/handlers.py,
    which imports this module: hence `api` untyped and `request_ids`, its engine_request_id,
    handed in)."""

    def __init__(self, api: Any, request_ids: RequestIds) -> None:
        self.api = api
        self.request_ids = request_ids

    async def messages(self, request: Request) -> Response | EventSourceResponse:
        try:
            return await self._messages(request)
        except HTTPError as exc:
            raise anthropic_error(exc) from None

    async def _messages(self, request: Request) -> Response | EventSourceResponse:
        api = self.api
        tracker = api.state.metrics.tracker()
        engine = api._engine(request)
        req = parse_messages_request(request.json())
        model = api._model(req.model)
        prompt_ids = chat_prompt(engine.tokenizer, req)
        sampling = await compile_structured(engine, req.sampling, req.structured)
        params = resolve_params(engine, [prompt_ids], sampling, "messages")
        # msg_ as Anthropic's ids start; the engine request id is the message id, as on chat
        message_id = "msg_" + self.request_ids("msg", request).removeprefix("msg-")
        meta = {"id": message_id, "model": model}
        output = MessageOutput(req, meta, len(prompt_ids), tracker)
        return await api._run(request, engine, output, message_id, [prompt_ids], params, req.stream)

    async def count_tokens(self, request: Request) -> Response:
        try:
            engine = self.api._engine(request)
            req = parse_messages_request(request.json(), counting=True)
            self.api._model(req.model)
            return JSONResponse({"input_tokens": len(chat_prompt(engine.tokenizer, req))})
        except HTTPError as exc:
            raise anthropic_error(exc) from None


def add_anthropic_routes(router: Router, api: Any, request_ids: RequestIds) -> None:
    """The endpoints on `router`, and Anthropic-shaped errors for every path under them."""
    anthropic = AnthropicAPI(api, request_ids)
    router.add("POST", PATH, anthropic.messages)
    router.add("POST", f"{PATH}/count_tokens", anthropic.count_tokens)
    router.add_error_format(PATH, anthropic_error)
