"""Anthropic Messages request bodies -> the chat endpoint's own `ChatCompletionRequest`.

POST /v1/messages and /v1/messages/count_tokens (server/api/anthropic.py) run the chat path, so
this module only translates: `system` and `messages` (text, tool_use and tool_result blocks)
become chat-template messages, `tools` ({name, description, input_schema}) the OpenAI function
shape, `tool_choice` auto / any / tool / none the chat choices "auto" / "required" /
"function" / "none" (any and tool are forced by the same tool-call grammar:
server/api/structured.py), and `max_tokens`, `temperature`, `top_p`, `top_k`,
`stop_sequences` the engine's SamplingParams through protocol.parse_sampling. A final
assistant message is a prefill the answer continues. Every bad field is a 400 whose message
names it (Anthropic's error shape has no `param`); `metadata` is checked, then ignored.
"""

from __future__ import annotations

from typing import Any

from model.sampling_params import SamplingParams
from server.api.fields import Fields, bad_request, check_depth
from server.api.protocol import ChatCompletionRequest, parse_sampling
from server.api.structured import tool_call_request

ROLES = ("user", "assistant")
# Anthropic's temperature range; parse_sampling then checks what the engine accepts.
MAX_TEMPERATURE = 1.0


def parse_messages_request(body: object, counting: bool = False) -> ChatCompletionRequest:
    """A /v1/messages body; `counting`: a count_tokens body (no max_tokens, no sampling)."""
    if not isinstance(body, dict):
        raise bad_request(None, "The request body must be a JSON object.")
    f = Fields(body)
    model = f.str("model")
    sampling = SamplingParams() if counting else _parse_sampling(f)
    stream = False if counting else f.bool("stream", False)
    metadata = f.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise bad_request("metadata", "'metadata' must be an object.")
    messages = _parse_system(f.get("system")) + _parse_messages(f.get("messages"))
    is_prefill = messages[-1]["role"] == "assistant"
    if is_prefill and "tool_calls" in messages[-1]:
        raise bad_request(
            "messages",
            "The final assistant message is continued, so it may hold only text; "
            "answer its tool_use blocks with a user message of tool_result blocks.",
        )
    tools = _parse_tools(f.get("tools"))
    tool_choice, tool_name, parallel = _parse_tool_choice(f.get("tool_choice"), tools)
    structured = None
    if tools is not None:
        structured = tool_call_request(tools, tool_choice, tool_name)
    if structured is not None and is_prefill:
        raise bad_request(
            "tool_choice",
            "A final assistant message (a prefill) cannot be combined with 'tool_choice' "
            f"{body['tool_choice']['type']!r}.",
        )
    return ChatCompletionRequest(
        model=model,
        messages=messages,
        sampling=sampling,
        stream=stream,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel,
        structured=structured,
        add_generation_prompt=not is_prefill,
        continue_final_message=is_prefill,
    )


# ---- sampling --------------------------------------------------------------------------------


def _parse_sampling(f: Fields) -> SamplingParams:
    if f.get("max_tokens") is None:
        raise bad_request("max_tokens", "'max_tokens' is required.")
    f.number("temperature", 1.0, 0.0, MAX_TEMPERATURE)
    stop = _parse_stop_sequences(f.get("stop_sequences"))
    fields = {name: f.get(name) for name in ("max_tokens", "temperature", "top_p", "top_k")}
    return parse_sampling(Fields({**fields, "stop": stop}), 1, None, "max_tokens")


def _parse_stop_sequences(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise bad_request("stop_sequences", "'stop_sequences' must be an array of strings.")
    if not all(value):
        raise bad_request("stop_sequences", "'stop_sequences' strings must not be empty.")
    return list(value)


# ---- system and messages ---------------------------------------------------------------------


def _parse_system(value: object) -> list[dict[str, Any]]:
    """The system prompt as a leading system message (none when absent)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}]
    if not isinstance(value, list):
        raise bad_request("system", "'system' must be a string or an array of text blocks.")
    texts = []
    for j, block in enumerate(value):
        param = f"system[{j}]"
        kind = _block_type(block, param)
        if kind != "text":
            raise bad_request(f"{param}.type", f"'{param}.type' must be 'text', not {kind!r}.")
        texts.append(_text(block, param))
    return [{"role": "system", "content": "\n".join(texts)}]


def _parse_messages(value: object) -> list[dict[str, Any]]:
    """Anthropic turns -> chat-template messages: a user turn's tool_result blocks become tool
    messages (in order, around its text), an assistant turn's tool_use blocks its tool_calls."""
    if not isinstance(value, list) or not value:
        raise bad_request("messages", "'messages' must be a non-empty array of messages.")
    out: list[dict[str, Any]] = []
    tool_names: dict[str, str] = {}  # tool_use id -> tool name, for the tool_results after it
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(param, f"'{param}' must be an object.")
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(f"{param}.role", f"'{param}.role' must be 'user' or 'assistant'.")
        blocks = _content_blocks(message.get("content"), f"{param}.content")
        if role == "user":
            out.extend(_user_turn(blocks, f"{param}.content", tool_names))
        else:
            out.append(_assistant_turn(blocks, f"{param}.content", tool_names))
    return out


def _content_blocks(content: object, param: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not content:
        raise bad_request(param, f"'{param}' must be a string or a non-empty array of blocks.")
    for j, block in enumerate(content):
        _block_type(block, f"{param}[{j}]")
    return content


def _block_type(block: object, param: str) -> object:
    if not isinstance(block, dict):
        raise bad_request(param, f"'{param}' must be an object (a content block).")
    return block.get("type")


def _unsupported(kind: object, param: str, allowed: str) -> Exception:
    return bad_request(
        f"{param}.type", f"'{param}.type' {kind!r} is not supported here; use {allowed}."
    )


def _text(block: dict[str, Any], param: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise bad_request(f"{param}.text", f"'{param}.text' must be a string.")
    return text


def _user_turn(
    blocks: list[dict[str, Any]], param: str, tool_names: dict[str, str]
) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    texts: list[str] = []
    for j, block in enumerate(blocks):
        bp = f"{param}[{j}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, bp))
        elif kind == "tool_result":
            if texts:
                out.append({"role": "user", "content": "\n".join(texts)})
                texts = []
            out.append(_tool_result(block, bp, tool_names))
        else:
            raise _unsupported(kind, bp, "'text' or 'tool_result'")
    if texts:
        out.append({"role": "user", "content": "\n".join(texts)})
    return out


def _tool_result(block: dict[str, Any], param: str, tool_names: dict[str, str]) -> dict[str, Any]:
    f = Fields(block, f"{param}.")
    call_id = f.str("tool_use_id")
    if call_id is None:
        raise bad_request(f.param("tool_use_id"), f"'{f.param('tool_use_id')}' is required.")
    if call_id not in tool_names:
        raise bad_request(
            f.param("tool_use_id"),
            f"'{f.param('tool_use_id')}' {call_id!r} answers no tool_use block of an earlier "
            "assistant message.",
        )
    f.bool("is_error", False)
    content = block.get("content")
    if content is None or isinstance(content, str):
        text = content or ""
    elif isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            pp = f"{param}.content[{k}]"
            kind = _block_type(part, pp)
            if kind != "text":
                raise _unsupported(kind, pp, "'text'")
            texts.append(_text(part, pp))
        text = "\n".join(texts)
    else:
        raise bad_request(
            f.param("content"), f"'{f.param('content')}' must be a string or an array of blocks."
        )
    return {"role": "tool", "content": text, "tool_call_id": call_id, "name": tool_names[call_id]}


def _assistant_turn(
    blocks: list[dict[str, Any]], param: str, tool_names: dict[str, str]
) -> dict[str, Any]:
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, block in enumerate(blocks):
        bp = f"{param}[{j}]"
        kind = block["type"]
        if kind == "text":
            texts.append(_text(block, bp))
        elif kind == "tool_use":
            calls.append(_tool_use(block, bp, tool_names))
        else:
            raise _unsupported(kind, bp, "'text' or 'tool_use'")
    message: dict[str, Any] = {"role": "assistant", "content": "\n".join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message


def _tool_use(block: dict[str, Any], param: str, tool_names: dict[str, str]) -> dict[str, Any]:
    f = Fields(block, f"{param}.")
    for name in ("id", "name"):
        if not f.str(name):
            raise bad_request(f.param(name), f"'{f.param(name)}' must be a non-empty string.")
    arguments = block.get("input")
    if not isinstance(arguments, dict):
        raise bad_request(f.param("input"), f"'{f.param('input')}' must be an object.")
    check_depth(arguments, f.param("input"))
    tool_names[block["id"]] = block["name"]
    # the chat templates' shape: arguments as an object (server/api/chat_messages.py)
    return {
        "id": block["id"],
        "type": "function",
        "function": {"name": block["name"], "arguments": arguments},
    }


# ---- tools -----------------------------------------------------------------------------------


def _parse_tools(value: object) -> list[dict[str, Any]] | None:
    """Anthropic tools -> OpenAI function tools (what templates and the tool grammar read)."""
    if value is None:
        return None
    if not isinstance(value, list):
        raise bad_request("tools", "'tools' must be an array.")
    tools: list[dict[str, Any]] = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(param, f"'{param}' must be an object.")
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise bad_request(
                f"{param}.type",
                f"'{param}.type' {kind!r} is not supported; give custom tools "
                "(name, description, input_schema).",
            )
        f = Fields(tool, f"{param}.")
        name = f.str("name")
        if not name:
            raise bad_request(f.param("name"), f"'{f.param('name')}' must be a non-empty string.")
        if name in names:
            raise bad_request(f.param("name"), f"'{f.param('name')}' repeats the name {name!r}.")
        names.add(name)
        description = f.str("description")
        schema = tool.get("input_schema")
        if not isinstance(schema, dict):
            raise bad_request(
                f.param("input_schema"),
                f"'{f.param('input_schema')}' must be an object (a JSON schema).",
            )
        check_depth(schema, f.param("input_schema"))
        function: dict[str, Any] = {"name": name, "parameters": schema}
        if description is not None:
            function["description"] = description
        tools.append({"type": "function", "function": function})
    return tools or None


def _parse_tool_choice(
    value: object, tools: list[dict[str, Any]] | None
) -> tuple[str, str | None, bool]:
    """(chat tool_choice, the named tool, parallel tool calls) of Anthropic's tool_choice."""
    if value is None:
        return ("auto" if tools else "none"), None, True
    if not isinstance(value, dict):
        raise bad_request(
            "tool_choice", '\'tool_choice\' must be an object such as {"type": "auto"}.'
        )
    f = Fields(value, "tool_choice.")
    parallel = not f.bool("disable_parallel_tool_use", False)
    kind = value.get("type")
    if kind in ("auto", "none"):
        return kind, None, parallel
    if kind not in ("any", "tool"):
        raise bad_request(
            "tool_choice.type", "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'."
        )
    if not tools:
        raise bad_request("tool_choice", f"'tool_choice' {kind!r} needs 'tools'.")
    if kind == "any":
        return "required", None, parallel
    name = f.str("name")
    if name is None:
        raise bad_request("tool_choice.name", "'tool_choice.name' is required for type 'tool'.")
    if all(t["function"]["name"] != name for t in tools):
        raise bad_request(
            "tool_choice.name",
            f"'tool_choice.name' names the tool {name!r}, which is not in 'tools'.",
        )
    return "function", name, parallel
