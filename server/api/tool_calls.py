"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

This is the form the Qwen2.5/Qwen3 (and Hermes) chat templates ask models to write. One
incremental parser serves streaming and non-streaming alike, so both give the same answer:
text outside tool-call tags is content, each well-formed tag is a tool call, and a tag whose
body is not a JSON object with a string "name" stays in the content verbatim; so does a call
of a function the request did not declare (`names`), and any call past `max_calls`
(parallel_tool_calls false: one).
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def to_delta(self, index: int) -> dict:
        return {"index": index, **self.to_dict()}


def parse_tool_call_body(body: str) -> ToolCall | None:
    """The JSON between the tags, or None when it is not a valid call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if arguments is None:
        arguments = {}
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_tool_call_id(), name=obj["name"], arguments=arguments)


def _partial_prefix_len(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker`."""
    for size in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


class ToolCallParser:
    """Incremental parser: feed generated text with push(), then call finish() once.

    Text that may be the start of a `<tool_call>` tag is held back until it is clear, and so
    is trailing whitespace (dropped at the end when the output holds tool calls, so content
    such as "Let me check.\\n" before a call comes back as "Let me check.").
    """

    def __init__(self, names: set[str] | None = None, max_calls: int | None = None) -> None:
        self.names = names  # None: any name
        self.max_calls = max_calls  # None: no limit
        self._buffer = ""
        self._in_call = False
        self._held_whitespace = ""
        self.num_tool_calls = 0
        self._finished = False

    def _emit(self, text: str, out: list[str]) -> None:
        if not text:
            return
        text = self._held_whitespace + text
        stripped = text.rstrip()
        self._held_whitespace = text[len(stripped) :]
        if stripped:
            out.append(stripped)

    def _close_call(self, body: str, out: list[str], calls: list[ToolCall], closed: bool) -> None:
        call = parse_tool_call_body(body)
        if call is not None and self.names is not None and call.name not in self.names:
            call = None
        if (
            call is not None
            and self.max_calls is not None
            and self.num_tool_calls >= self.max_calls
        ):
            call = None
        if call is None:
            self._emit(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), out)
            return
        self._held_whitespace = ""  # whitespace between content and a call is not content
        self.num_tool_calls += 1
        calls.append(call)

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Returns (content safe to emit now, tool calls completed by this text)."""
        assert not self._finished, "push after finish"
        self._buffer += text
        out: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                start = self._buffer.find(TOOL_CALL_START)
                if start >= 0:
                    self._emit(self._buffer[:start], out)
                    self._buffer = self._buffer[start + len(TOOL_CALL_START) :]
                    self._in_call = True
                    continue
                keep = _partial_prefix_len(self._buffer, TOOL_CALL_START)
                self._emit(self._buffer[: len(self._buffer) - keep], out)
                self._buffer = self._buffer[len(self._buffer) - keep :]
                break
            end = self._buffer.find(TOOL_CALL_END)
            if end < 0:
                break
            body = self._buffer[:end]
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            self._in_call = False
            self._close_call(body, out, calls, closed=True)
        return "".join(out), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """Flushes what was held back; an unclosed call whose body is valid JSON still counts."""
        assert not self._finished, "finish twice"
        self._finished = True
        out: list[str] = []
        calls: list[ToolCall] = []
        if self._in_call:
            self._close_call(self._buffer, out, calls, closed=False)
        else:
            self._emit(self._buffer, out)
        self._buffer = ""
        if self.num_tool_calls == 0:
            out.append(self._held_whitespace)
        self._held_whitespace = ""
        return "".join(out), calls


def parse_tool_calls(
    text: str, names: set[str] | None = None, max_calls: int | None = None
) -> tuple[str | None, list[ToolCall]]:
    """Non-streaming: (content or None when only tool calls were written, tool calls)."""
    parser = ToolCallParser(names, max_calls)
    content, calls = parser.push(text)
    rest, more = parser.finish()
    content += rest
    calls += more
    if calls and not content.strip():
        return None, calls
    return content, calls
