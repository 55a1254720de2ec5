"""Hermes-style tool calls: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

This is the form the Qwen2.5/Qwen3 (and Hermes) chat templates ask models to write. One
incremental parser serves streaming and non-streaming alike, so both give the same answer:
text outside tool-call tags is content, each well-formed tag is a tool call, and a tag whose
body is not a JSON object with a string "name" stays in the content verbatim; so does a call
of a function the request did not declare (`names`), and any call past `max_calls`
(parallel_tool_calls false: one). A call streams as OpenAI streams it: a first piece with the
call's id and name as soon as `{"name": "...", "arguments": ` is written, then its arguments
text as it is generated (ToolCallDelta; server/api/outputs.py turns them into chunks).
"""

from __future__ import annotations

import json
import re
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


# The start of a call body in the order the Hermes prompt asks for, up to the `{` that opens
# the arguments object: from there the call is known and its arguments stream as written.
_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"(?:arguments|parameters)"\s*:\s*(?=\{)'
)
# What may close the call object after the arguments: held back until the call ends.
_TAIL = re.compile(r"\s*(?:\}\s*)?$")


@dataclass
class ToolCallDelta:
    """A piece of a streamed tool call: the first one of a call carries its id and name, the
    later ones only `arguments` text; the last one has `is_last` (call.arguments is then whole)."""

    index: int  # the call's position among this output's calls
    call: ToolCall
    arguments: str
    is_first: bool
    is_last: bool

    def to_delta(self) -> dict:
        if not self.is_first:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        head = {"index": self.index, "id": self.call.id, "type": "function"}
        return {**head, "function": {"name": self.call.name, "arguments": self.arguments}}


ParserEvent = str | ToolCallDelta  # content text, or a piece of a tool call


def tool_call_deltas(pieces: list[ToolCallDelta]) -> list[dict]:
    """OpenAI's `delta.tool_calls` for one chunk: the pieces of one call merged into one."""
    out: list[dict] = []
    for piece in pieces:
        if out and out[-1]["index"] == piece.index:
            out[-1]["function"]["arguments"] += piece.arguments
        else:
            out.append(piece.to_delta())
    return out


class ToolCallParser:
    """Incremental parser: feed generated text with push() or push_events(), then call
    finish() (or finish_events()) once.

    Text that may be the start of a `<tool_call>` tag is held back until it is clear, and so
    is trailing whitespace (dropped at the end when the output holds tool calls, so content
    such as "Let me check.\\n" before a call comes back as "Let me check."). A call body that
    starts `{"name": "<declared tool>", "arguments": ` is a call from then on: its arguments
    stream as written (the closing brace of the call object held back), so they are the model's
    own JSON text. Any other body is judged whole when its tag closes (parse_tool_call_body).
    """

    def __init__(self, names: set[str] | None = None, max_calls: int | None = None) -> None:
        self.names = names  # None: any name
        self.max_calls = max_calls  # None: no limit
        self._buffer = ""
        self._in_call = False
        self._streaming: ToolCallDelta | None = None  # the call whose arguments are streaming
        self._held_whitespace = ""
        self.num_tool_calls = 0
        self._finished = False

    def _accepts(self, name: str) -> bool:
        if self.names is not None and name not in self.names:
            return False
        return self.max_calls is None or self.num_tool_calls < self.max_calls

    def _emit(self, text: str, out: list[ParserEvent]) -> None:
        if not text:
            return
        text = self._held_whitespace + text
        stripped = text.rstrip()
        self._held_whitespace = text[len(stripped) :]
        if stripped:
            out.append(stripped)

    def _start_call(self, call: ToolCall, out: list[ParserEvent]) -> ToolCallDelta:
        self._held_whitespace = ""  # whitespace between content and a call is not content
        first = ToolCallDelta(self.num_tool_calls, call, call.arguments, True, False)
        self.num_tool_calls += 1
        out.append(first)
        return first

    def _close_call(self, body: str, out: list[ParserEvent], closed: bool) -> None:
        """A body that did not stream, judged whole: a call, or content verbatim."""
        call = parse_tool_call_body(body)
        if call is None or not self._accepts(call.name):
            self._emit(TOOL_CALL_START + body + (TOOL_CALL_END if closed else ""), out)
            return
        self._start_call(call, out).is_last = True

    def _try_header(self, out: list[ParserEvent]) -> None:
        m = _HEADER.match(self._buffer)
        if m is None:
            return
        name = json.loads(m.group(1))
        if not name or not self._accepts(name):
            return  # judged whole at the end, where it stays content
        self._streaming = self._start_call(ToolCall(new_tool_call_id(), name, ""), out)
        self._buffer = self._buffer[m.end() :]

    def _stream_arguments(self, text: str, out: list[ParserEvent], is_last: bool) -> None:
        current = self._streaming
        assert current is not None
        if is_last:
            self._streaming = None
        if not text and not is_last:
            return
        current.call.arguments += text
        out.append(ToolCallDelta(current.index, current.call, text, False, is_last))

    def push_events(self, text: str) -> list[ParserEvent]:
        """Content and tool-call pieces that are safe to emit now, in output order."""
        assert not self._finished, "push after finish"
        self._buffer += text
        out: list[ParserEvent] = []
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
            if self._streaming is None:
                self._try_header(out)
            end = self._buffer.find(TOOL_CALL_END)
            if end < 0:
                if self._streaming is not None:
                    keep = _partial_prefix_len(self._buffer, TOOL_CALL_END)
                    ready = self._buffer[: len(self._buffer) - keep]
                    ready = ready[: _TAIL.search(ready).start()]
                    self._buffer = self._buffer[len(ready) :]
                    self._stream_arguments(ready, out, is_last=False)
                break
            body = self._buffer[:end]
            self._buffer = self._buffer[end + len(TOOL_CALL_END) :]
            self._in_call = False
            if self._streaming is not None:
                self._stream_arguments(body[: _TAIL.search(body).start()], out, is_last=True)
            else:
                self._close_call(body, out, closed=True)
        return out

    def finish_events(self) -> list[ParserEvent]:
        """Flushes what was held back; an unclosed call that was streaming ends here, and an
        unclosed body that is a whole valid call still counts."""
        assert not self._finished, "finish twice"
        self._finished = True
        out: list[ParserEvent] = []
        if self._streaming is not None:
            rest = self._buffer[: _TAIL.search(self._buffer).start()]
            self._stream_arguments(rest, out, is_last=True)
        elif self._in_call:
            self._close_call(self._buffer, out, closed=False)
        else:
            self._emit(self._buffer, out)
        self._buffer = ""
        if self.num_tool_calls == 0 and self._held_whitespace:
            out.append(self._held_whitespace)
        self._held_whitespace = ""
        return out

    def push(self, text: str) -> tuple[str, list[ToolCall]]:
        """Returns (content safe to emit now, tool calls completed by this text)."""
        return _fold(self.push_events(text))

    def finish(self) -> tuple[str, list[ToolCall]]:
        return _fold(self.finish_events())


def _fold(events: list[ParserEvent]) -> tuple[str, list[ToolCall]]:
    text = "".join(e for e in events if isinstance(e, str))
    return text, [e.call for e in events if isinstance(e, ToolCallDelta) and e.is_last]


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
