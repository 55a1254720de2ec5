"""OpenAI Responses request bodies (POST /v1/responses) -> the internal chat request.

The server is stateless: `store` must be false (absent counts as false) and nothing may refer
to an earlier response (`previous_response_id`, `conversation`, `item_reference`, `background`).
`instructions` and the `input` items become chat messages in the shape chat templates expect,
function tools the chat `tools`, `tool_choice` the chat one, `text.format` the structured-output
constraint; the sampling fields go through the chat parser's `parse_sampling`. So prompt
rendering, sampling, structured outputs and tool calls are the chat endpoint's. What the
Response object repeats of the request is kept in `ResponsesRequest.echo`. Every bad field is a
400 naming it in the Responses shape (`input[2].content[0].type`, `text.format.schema`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from model.structured import StructuredSpec
from server.api.chat_messages import parse_tool_choice
from server.api.fields import Fields, bad_request, check_depth, too_deep
from server.api.protocol import ChatCompletionRequest, parse_sampling
from server.api.structured import StructuredRequest, tool_call_request
from server.http.errors import HTTPError

# The content part type each message role takes.
PART_TYPE_BY_ROLE = {
    "user": "input_text",
    "system": "input_text",
    "developer": "input_text",
    "assistant": "output_text",
}
ITEM_TYPES = ("message", "function_call", "function_call_output")
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512


@dataclass
class ResponsesRequest:
    chat: ChatCompletionRequest  # what is rendered and generated
    echo: dict[str, Any]  # the Response object's fields that repeat the request


def _stateless(param: str, what: str) -> HTTPError:
    return bad_request(
        param,
        f"This server is stateless: it stores no responses, so {what}. "
        "Send the whole conversation in 'input'.",
    )


def _text(value: object, param: str, part_type: str) -> str:
    """A string, or an array of `part_type` parts ({"type", "text"}) joined by newlines."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad_request(param, f"'{param}' must be a string or an array of content parts.")
    texts = []
    for j, part in enumerate(value):
        p = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise bad_request(p, f"'{p}' must be an object.")
        if part.get("type") != part_type:
            raise bad_request(
                f"{p}.type",
                f"Content part type {part.get('type')!r} is not supported in '{param}'; "
                f"only '{part_type}' is.",
            )
        text = part.get("text")
        if not isinstance(text, str):
            raise bad_request(f"{p}.text", f"'{p}.text' must be a string.")
        texts.append(text)
    return "\n".join(texts)


def _required_str(f: Fields, name: str) -> str:
    value = f.str(name)
    if not value:
        raise bad_request(f.param(name), f"'{f.param(name)}' is required (a non-empty string).")
    return value


def _arguments(value: str, param: str) -> Any:
    """Function-call arguments as the templates expect them: the parsed object when it is JSON
    (as Hugging Face passes them), else the text."""
    try:
        parsed = json.loads(value) if value else {}
    except ValueError:
        return value
    except RecursionError:  # deeper than Python's parser goes
        raise too_deep(param) from None
    check_depth(parsed, param)
    return parsed


def _message(f: Fields) -> dict[str, Any]:
    role = f.get("role")
    if role not in PART_TYPE_BY_ROLE:
        raise bad_request(
            f.param("role"), f"'{f.param('role')}' must be one of {', '.join(PART_TYPE_BY_ROLE)}."
        )
    if f.get("content") is None:
        raise bad_request(f.param("content"), f"'{f.param('content')}' is required.")
    content = _text(f.get("content"), f.param("content"), PART_TYPE_BY_ROLE[role])
    # open-model templates know no "developer" role; it is OpenAI's new name for "system"
    return {"role": "system" if role == "developer" else role, "content": content}


def parse_input(value: object, instructions: str | None) -> list[dict[str, Any]]:
    """`instructions` (a system message first) and `input` -> chat messages."""
    messages: list[dict[str, Any]] = []
    if instructions:
        messages.append({"role": "system", "content": instructions})
    if isinstance(value, str):
        return [*messages, {"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise bad_request("input", "'input' must be a string or a non-empty array of items.")
    call_ids: set[str] = set()
    for i, item in enumerate(value):
        p = f"input[{i}]"
        if not isinstance(item, dict):
            raise bad_request(p, f"'{p}' must be an object.")
        f = Fields(item, f"{p}.")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append(_message(f))
        elif kind == "function_call":
            call_id = _required_str(f, "call_id")
            name = _required_str(f, "name")
            arguments = _arguments(_required_str(f, "arguments"), f.param("arguments"))
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            call_ids.add(call_id)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls after its text
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _required_str(f, "call_id")
            if call_id not in call_ids:
                raise bad_request(
                    f.param("call_id"),
                    f"No function_call item with call_id {call_id!r} comes before '{p}'.",
                )
            if f.get("output") is None:
                raise bad_request(f.param("output"), f"'{f.param('output')}' is required.")
            output = _text(f.get("output"), f.param("output"), "input_text")
            messages.append({"role": "tool", "content": output, "tool_call_id": call_id})
        elif kind == "item_reference":
            raise _stateless(f.param("type"), "'item_reference' items cannot be resolved")
        else:
            raise bad_request(
                f.param("type"),
                f"Input item type {kind!r} is not supported; use {', '.join(ITEM_TYPES)}.",
            )
    if messages[-1]["role"] == "assistant":
        raise bad_request(
            "input",
            "The last input item is the assistant's (a message or function_call); end with a "
            "user, system or function_call_output item.",
        )
    return messages


def parse_tools(value: object) -> tuple[list[dict[str, Any]] | None, list[dict[str, Any]]]:
    """Responses function tools ({type, name, description, parameters, strict}) -> (the chat
    tools, the tools as the Response object lists them)."""
    if value is None:
        return None, []
    if not isinstance(value, list):
        raise bad_request("tools", "'tools' must be an array.")
    chat_tools, echoed = [], []
    for i, tool in enumerate(value):
        p = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise bad_request(p, f"'{p}' must be an object.")
        f = Fields(tool, f"{p}.")
        if tool.get("type") != "function":
            raise bad_request(
                f.param("type"),
                f"Tool type {tool.get('type')!r} is not supported; only 'function' tools are "
                "(built-in tools such as web_search are not available on this server).",
            )
        name = _required_str(f, "name")
        description = f.str("description")
        parameters = f.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(
                f.param("parameters"), f"'{f.param('parameters')}' must be an object."
            )
        strict = f.bool("strict", True)
        check_depth(tool, p)
        function: dict[str, Any] = {"name": name}
        if description is not None:
            function["description"] = description
        if parameters is not None:
            function["parameters"] = parameters
        chat_tools.append({"type": "function", "function": function})
        echoed.append(
            {
                "type": "function",
                "name": name,
                "description": description,
                "parameters": parameters,
                "strict": strict,
            }
        )
    return chat_tools or None, echoed


def _chat_tool_choice(value: object) -> object:
    """Responses' named choice {type: "function", name} -> the chat shape; strings as they are."""
    if not isinstance(value, dict):
        return value
    if value.get("type") != "function":
        raise bad_request(
            "tool_choice",
            f"'tool_choice' of type {value.get('type')!r} is not supported; use 'none', 'auto', "
            '\'required\' or {"type": "function", "name": ...}.',
        )
    name = value.get("name")
    if not isinstance(name, str):
        raise bad_request("tool_choice", "A named 'tool_choice' needs 'name' (a string).")
    return {"type": "function", "function": {"name": name}}


def parse_text_format(value: object) -> tuple[StructuredSpec | None, dict[str, Any]]:
    """`text.format` -> (the constraint, the format the Response object repeats)."""
    if value is None:
        return None, {"type": "text"}
    if not isinstance(value, dict):
        raise bad_request("text", "'text' must be an object.")
    fmt = value.get("format")
    if fmt is None:
        return None, {"type": "text"}
    if not isinstance(fmt, dict):
        raise bad_request("text.format", "'text.format' must be an object.")
    kind = fmt.get("type")
    if kind == "text":
        return None, {"type": "text"}
    if kind == "json_object":
        return StructuredSpec("json_object"), {"type": "json_object"}
    if kind != "json_schema":
        raise bad_request(
            "text.format.type", "'text.format.type' must be 'text', 'json_object' or 'json_schema'."
        )
    f = Fields(fmt, "text.format.")
    name = _required_str(f, "name")  # it only labels the schema
    description = f.str("description")
    strict = f.bool("strict", False)  # the output always follows the schema exactly
    schema = fmt.get("schema")
    if not isinstance(schema, (dict, bool)):
        raise bad_request(
            "text.format.schema", "'text.format.schema' is required (a JSON schema, an object)."
        )
    echoed = {"type": "json_schema", "name": name, "schema": schema, "strict": strict}
    if description is not None:
        echoed["description"] = description
    return StructuredSpec("json_schema", schema), echoed


def _metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request("metadata", "'metadata' must be an object of string values.")
    if len(value) > MAX_METADATA_PAIRS:
        raise bad_request("metadata", f"'metadata' holds at most {MAX_METADATA_PAIRS} pairs.")
    for key, v in value.items():
        if len(key) > MAX_METADATA_KEY_CHARS or len(v) > MAX_METADATA_VALUE_CHARS:
            raise bad_request(
                "metadata",
                f"'metadata' keys are at most {MAX_METADATA_KEY_CHARS} characters and values at "
                f"most {MAX_METADATA_VALUE_CHARS} (key {key[:MAX_METADATA_KEY_CHARS]!r}).",
            )
    return dict(value)


def parse_responses_request(body: object) -> ResponsesRequest:
    if not isinstance(body, dict):
        raise bad_request(None, "The request body must be a JSON object.")
    f = Fields(body)
    if f.bool("store", False):
        raise _stateless("store", "'store' must be false")
    if f.get("previous_response_id") is not None:
        raise _stateless("previous_response_id", "'previous_response_id' cannot be used")
    if f.get("conversation") is not None:
        raise _stateless("conversation", "'conversation' cannot be used")
    if f.bool("background", False):
        raise _stateless("background", "'background' must be false")
    instructions = f.str("instructions")
    messages = parse_input(f.get("input"), instructions)
    sampling = parse_sampling(f, 1, None, "max_output_tokens")
    stream = f.bool("stream", False)
    spec, text_format = parse_text_format(f.get("text"))
    structured = StructuredRequest(spec, "text.format") if spec is not None else None
    tools, echoed_tools = parse_tools(f.get("tools"))
    tool_choice, tool_name = parse_tool_choice(_chat_tool_choice(f.get("tool_choice")), tools)
    parallel_tool_calls = f.bool("parallel_tool_calls", True)
    if tools is not None:
        forced = tool_call_request(tools, tool_choice, tool_name)
        if forced is not None:
            if structured is not None:
                raise bad_request(
                    "text.format",
                    f"'text.format' cannot be combined with tool_choice {tool_choice!r}.",
                )
            structured = forced
    chat = ChatCompletionRequest(
        model=f.str("model"),
        messages=messages,
        sampling=sampling,
        max_tokens_param="max_output_tokens",
        stream=stream,
        tools=tools,
        tool_choice=tool_choice,
        tool_name=tool_name,
        parallel_tool_calls=parallel_tool_calls,
        structured=structured,
    )
    echo = {
        "instructions": instructions,
        "max_output_tokens": sampling.max_tokens,
        "metadata": _metadata(f.get("metadata")),
        "parallel_tool_calls": parallel_tool_calls,
        "temperature": sampling.temperature,
        "text": {"format": text_format},
        "tool_choice": f.get("tool_choice") or "auto",
        "tools": echoed_tools,
        "top_p": sampling.top_p,
        "user": f.str("user"),
    }
    return ResponsesRequest(chat, echo)
