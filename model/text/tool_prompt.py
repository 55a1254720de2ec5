"""Tools for chat templates that do not render them: a Hermes-style tool prompt in the messages.

Many small models' templates (SmolLM2's among them) drop `tools`, write an assistant turn's
`tool_calls` as nothing and a `tool` turn as a bare message, so the model never learns which
tools exist and a tool round trip loses its history. For such a template the chat is rewritten
before rendering, in the form Qwen2.5's template (from Hermes) writes and
server/api/tool_calls.py parses:

- the tool definitions go into the system message, after its own text, in `<tools></tools>`
  with the instruction to answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
- an assistant turn's calls are appended to its content as those tags;
- each run of `tool` turns becomes one user turn of `<tool_response>...</tool_response>` blocks.

`template_renders_tools` tells the two kinds apart by rendering a probe chat with a tool and
without it: a template that renders tools writes the tool's name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from model.errors import TemplateError

TOOL_PROMPT_MODES = ("auto", "hermes", "none")

_PROBE_NAME = "nanoserve_probe_tool_5d1c"
_PROBE_TOOLS = [
    {
        "type": "function",
        "function": {"name": _PROBE_NAME, "description": "probe", "parameters": {}},
    }
]

_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
_FOOTER = (
    "</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)

Render = Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]


def template_renders_tools(render: Render) -> bool:
    """Whether the template writes `tools` into the prompt (a template that fails on the probe
    chat counts as one that does not)."""
    chat = [{"role": "user", "content": "Hi"}]
    try:
        return _PROBE_NAME in render(chat, _PROBE_TOOLS)
    except TemplateError:
        return False


def needs_tool_prompt(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> bool:
    """Whether there is anything to rewrite: tools, or tool calls or results in the history."""
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def tool_system_text(tools: list[dict[str, Any]]) -> str:
    lines = [json.dumps(_as_function_tool(t), ensure_ascii=False) for t in tools]
    return "\n".join([_HEADER, *lines, _FOOTER])


def _as_function_tool(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": tool["function"]}


def _call_text(call: dict[str, Any]) -> str:
    fn = call["function"]
    arguments = fn.get("arguments", {})
    if isinstance(arguments, str):  # arguments that were not JSON stay the client's text
        body = f'{{"name": {json.dumps(fn["name"], ensure_ascii=False)}, "arguments": {arguments}}}'
    else:
        body = json.dumps({"name": fn["name"], "arguments": arguments}, ensure_ascii=False)
    return f"<tool_call>\n{body}\n</tool_call>"


def with_tool_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """The chat rewritten for a template that ignores tools (see the module docstring); the
    input is not modified. Render the result with tools=None."""
    out: list[dict[str, Any]] = []
    rest = messages
    if tools:
        tool_text = tool_system_text(tools)
        if messages and messages[0]["role"] == "system":
            system = messages[0]["content"]
            out.append(
                {**messages[0], "content": f"{system}\n\n{tool_text}" if system else tool_text}
            )
            rest = messages[1:]
        else:
            out.append({"role": "system", "content": tool_text})
    for msg in rest:
        if msg["role"] == "assistant" and msg.get("tool_calls"):
            parts = [msg["content"]] if msg.get("content") else []
            parts += [_call_text(call) for call in msg["tool_calls"]]
            plain = {k: v for k, v in msg.items() if k != "tool_calls"}
            out.append({**plain, "content": "\n".join(parts)})
        elif msg["role"] == "tool":
            block = f"<tool_response>\n{msg['content']}\n</tool_response>"
            previous = out[-1] if out else None
            if previous is not None and previous.get("_tool_responses"):
                previous["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append(msg)
    return [{k: v for k, v in m.items() if k != "_tool_responses"} for m in out]
