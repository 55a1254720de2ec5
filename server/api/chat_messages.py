"""Chat messages, tools and template options -> the shapes chat templates expect, validated.

Used by the chat and tokenize requests in server/api/protocol.py; bad fields are 400s naming them.
"""

from __future__ import annotations

import json
from typing import Any

from server.api.fields import Fields, bad_request, check_depth, too_deep

ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(value: object, param: str = "messages") -> list[dict[str, Any]]:
    """Validates OpenAI chat messages; returns them in the shape chat templates expect."""
    if not isinstance(value, list) or not value:
        raise bad_request(param, f"'{param}' must be a non-empty array of messages.")
    return [_parse_message(m, f"{param}[{i}]") for i, m in enumerate(value)]


def _parse_message(msg: object, param: str) -> dict[str, Any]:
    if not isinstance(msg, dict):
        raise bad_request(param, f"'{param}' must be an object.")
    f = Fields(msg, f"{param}.")
    role = msg.get("role")
    if role not in ROLES:
        raise bad_request(
            f.param("role"), f"'{f.param('role')}' must be one of {', '.join(ROLES)}."
        )
    # open-model templates know no "developer" role; it is OpenAI's new name for "system"
    out: dict[str, Any] = {"role": "system" if role == "developer" else role}
    tool_calls = msg.get("tool_calls")
    content = msg.get("content")
    if content is None and role != "assistant":
        raise bad_request(f.param("content"), f"'{f.param('content')}' is required.")
    out["content"] = _parse_content(content, f.param("content"))
    name = f.str("name")
    if name is not None:
        out["name"] = name
    if tool_calls is not None:
        if role != "assistant":
            raise bad_request(f.param("tool_calls"), "Only assistant messages carry 'tool_calls'.")
        if tool_calls:
            out["tool_calls"] = _parse_message_tool_calls(tool_calls, f.param("tool_calls"))
    if role == "tool":
        call_id = f.str("tool_call_id")
        if call_id is None:
            raise bad_request(f.param("tool_call_id"), "Tool messages need a 'tool_call_id'.")
        out["tool_call_id"] = call_id
    return out


def _parse_content(content: object, param: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(param, f"'{param}' must be a string or an array of content parts.")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise bad_request(f"{param}[{j}]", f"'{param}[{j}]' must be an object.")
        if part.get("type") != "text":
            raise bad_request(
                f"{param}[{j}].type",
                f"Content part type {part.get('type')!r} is not supported; only 'text' is.",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{param}[{j}].text", f"'{param}[{j}].text' must be a string.")
        texts.append(text)
    return "\n".join(texts)


def _parse_message_tool_calls(value: object, param: str) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise bad_request(param, f"'{param}' must be an array.")
    calls = []
    for k, call in enumerate(value):
        p = f"{param}[{k}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request(f"{p}.function", f"'{p}.function' must be an object with a 'name'.")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):
            raise bad_request(f"{p}.function.arguments", "Tool call arguments must be a string.")
        try:  # templates expect the arguments as an object, as Hugging Face passes them
            parsed = json.loads(arguments) if arguments else {}
        except ValueError:
            parsed = arguments
        except RecursionError:  # deeper than Python's parser goes
            raise too_deep(f"{p}.function.arguments") from None
        check_depth(parsed, f"{p}.function.arguments")
        calls.append(
            {
                "id": str(call.get("id") or ""),
                "type": "function",
                "function": {"name": fn["name"], "arguments": parsed},
            }
        )
    return calls


def parse_tools(value: object) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools", "'tools' must be an array.")
    for i, tool in enumerate(value):
        p = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise bad_request(f"{p}.type", f"'{p}' must be a function tool.")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise bad_request(f"{p}.function", f"'{p}.function' must be an object.")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"{p}.function.name", f"'{p}.function.name' must be a string.")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad_request(f"{p}.function.parameters", "Tool parameters must be an object.")
        check_depth(tool, p)
    return value or None


def parse_tool_choice(value: object, tools: list[dict[str, Any]] | None) -> tuple[str, str | None]:
    """(choice, function name): "none" | "auto" | "required" | "function" (the named one, which
    must be one of `tools`). Absent: "auto" with tools, else "none"."""
    if value is None:
        return ("auto" if tools else "none"), None
    if value in ("none", "auto"):
        return value, None
    if value == "required" or isinstance(value, dict):
        if not tools:
            raise bad_request("tool_choice", "'tool_choice' other than 'none' needs 'tools'.")
        if value == "required":
            return "required", None
        fn = value.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if value.get("type", "function") != "function" or not isinstance(name, str):
            raise bad_request(
                "tool_choice",
                'A named \'tool_choice\' must be {"type": "function", "function": {"name": ...}}.',
            )
        if all(t["function"]["name"] != name for t in tools):
            raise bad_request(
                "tool_choice",
                f"'tool_choice' names the function {name!r}, which is not in 'tools'.",
            )
        return "function", name
    raise bad_request(
        "tool_choice", "'tool_choice' must be 'none', 'auto', 'required' or a named function."
    )


# What the template receives from the request itself; chat_template_kwargs may not set it.
TEMPLATE_ARGUMENTS = (
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
)


def parse_template_kwargs(f: Fields) -> dict[str, Any]:
    value = f.get("chat_template_kwargs")
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise bad_request("chat_template_kwargs", "'chat_template_kwargs' must be an object.")
    taken = next((name for name in TEMPLATE_ARGUMENTS if name in value), None)
    if taken is not None:
        raise bad_request(
            "chat_template_kwargs",
            f"'chat_template_kwargs' may not set {taken!r}: the request itself gives the chat "
            "template that argument.",
        )
    check_depth(value, "chat_template_kwargs")
    return dict(value)
