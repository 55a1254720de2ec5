"""Structured-output fields -> one `StructuredSpec` per request, compiled before admission.

The fields: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's
`structured_outputs` (`json`, `regex`, `choice`, `json_object`) and its older `guided_json`,
`guided_regex`, `guided_choice`, and, for chat, `tool_choice` "required" or a named function
(the output is then one `<tool_call>` of a declared tool: model.structured.tool_call_spec).
At most one of them may constrain a request. `compile_structured` compiles the spec with the
engine's GrammarCompiler in a worker thread (never on the engine thread, never blocking the
event loop); a spec the compiler refuses is a 400 naming the field, and the SpecError's
message names the keyword at fault. The grammar travels to the engine in
SamplingParams.structured.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, replace
from typing import Any

from model.sampling_params import SamplingParams
from model.structured import SpecError, StructuredSpec, tool_call_spec
from server.api.engine_client import EngineClient
from server.api.fields import Fields, bad_request

# structured_outputs keys vLLM knows that this server does not enforce.
UNSUPPORTED_KINDS = ("grammar", "structural_tag")


@dataclass(frozen=True)
class StructuredRequest:
    spec: StructuredSpec
    param: str  # the request field that asked for it, named by a 400


def _json_value(value: object, param: str) -> Any:
    """A schema given as an object (or a boolean), or as JSON text (vLLM accepts both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise bad_request(param, f"'{param}' is not valid JSON.") from None
    if not isinstance(value, (dict, bool)):
        raise bad_request(param, f"'{param}' must be a JSON schema (an object).")
    return value


def _choice(value: object, param: str) -> list[str]:
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        raise bad_request(param, f"'{param}' must be a non-empty array of strings.")
    return list(value)


def _regex(value: object, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(param, f"'{param}' must be a string (a regular expression).")
    return value


def parse_response_format(value: object) -> StructuredSpec | None:
    """`text` (or absent): None; `json_object`; `json_schema` with its `json_schema` object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("response_format", "'response_format' must be an object.")
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredSpec("json_object")
    if kind != "json_schema":
        raise bad_request(
            "response_format",
            "'response_format.type' must be 'text', 'json_object' or 'json_schema'.",
        )
    body = value.get("json_schema")
    if not isinstance(body, dict):
        raise bad_request(
            "response_format.json_schema",
            "'response_format.json_schema' must be an object with 'name' and 'schema'.",
        )
    f = Fields(body, "response_format.json_schema.")
    if f.str("name") is None:  # OpenAI requires it; it only labels the schema
        raise bad_request(
            "response_format.json_schema.name", "'response_format.json_schema.name' is required."
        )
    f.str("description")
    f.bool("strict", False)  # the output always follows the schema exactly
    schema = body.get("schema")
    if schema is None:
        schema = {}
    elif not isinstance(schema, (dict, bool)):
        raise bad_request(
            "response_format.json_schema.schema",
            "'response_format.json_schema.schema' must be a JSON schema (an object).",
        )
    return StructuredSpec("json_schema", schema)


def parse_structured_outputs(value: object) -> StructuredSpec | None:
    """vLLM's `structured_outputs`: exactly one of json, regex, choice, json_object."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad_request("structured_outputs", "'structured_outputs' must be an object.")
    for kind in UNSUPPORTED_KINDS:
        if value.get(kind) is not None:
            raise bad_request(
                f"structured_outputs.{kind}",
                f"'structured_outputs.{kind}' is not supported; use json, regex or choice.",
            )
    specs = []
    if value.get("json") is not None:
        specs.append(
            StructuredSpec("json_schema", _json_value(value["json"], "structured_outputs.json"))
        )
    if value.get("regex") is not None:
        specs.append(StructuredSpec("regex", _regex(value["regex"], "structured_outputs.regex")))
    if value.get("choice") is not None:
        specs.append(
            StructuredSpec("choice", _choice(value["choice"], "structured_outputs.choice"))
        )
    if Fields(value, "structured_outputs.").bool("json_object", False):
        specs.append(StructuredSpec("json_object"))
    if len(specs) > 1:
        raise bad_request(
            "structured_outputs",
            "'structured_outputs' takes one of 'json', 'regex', 'choice', 'json_object'.",
        )
    return specs[0] if specs else None


def parse_structured(f: Fields) -> StructuredRequest | None:
    """The constraint the request's fields ask for (at most one field may ask); None: none."""
    found: list[StructuredRequest] = []

    def add(spec: StructuredSpec | None, param: str) -> None:
        if spec is None:
            return
        if found:
            raise bad_request(
                param,
                f"'{param}' and '{found[0].param}' both constrain the output; give one.",
            )
        found.append(StructuredRequest(spec, param))

    add(parse_response_format(f.get("response_format")), "response_format")
    add(parse_structured_outputs(f.get("structured_outputs")), "structured_outputs")
    if f.get("guided_json") is not None:
        add(
            StructuredSpec("json_schema", _json_value(f.get("guided_json"), "guided_json")),
            "guided_json",
        )
    if f.get("guided_regex") is not None:
        add(StructuredSpec("regex", _regex(f.get("guided_regex"), "guided_regex")), "guided_regex")
    if f.get("guided_choice") is not None:
        add(
            StructuredSpec("choice", _choice(f.get("guided_choice"), "guided_choice")),
            "guided_choice",
        )
    if f.get("guided_grammar") is not None:
        raise bad_request("guided_grammar", "'guided_grammar' is not supported.")
    return found[0] if found else None


def tool_call_request(
    tools: list[dict[str, Any]], tool_choice: str, tool_name: str | None
) -> StructuredRequest | None:
    """tool_choice "required" (one call of any declared tool) or "function" (of `tool_name`)."""
    if tool_choice == "required":
        return StructuredRequest(tool_call_spec(tools), "tools")
    if tool_choice == "function":
        named = [t for t in tools if t["function"]["name"] == tool_name]
        return StructuredRequest(tool_call_spec(named[:1]), "tools")
    return None


async def compile_structured(
    engine: EngineClient, params: SamplingParams, structured: StructuredRequest | None
) -> SamplingParams:
    """`params` with the compiled grammar of `structured` (unchanged when None). The compile
    runs in a worker thread; a spec the compiler refuses is a 400 naming its field."""
    if structured is None:
        return params

    def compile_spec() -> Any:
        return engine.grammar_compiler().compile(structured.spec)

    try:
        grammar = await asyncio.to_thread(compile_spec)
    except SpecError as exc:
        where = f" (keyword {exc.keyword!r})" if exc.keyword else ""
        raise bad_request(structured.param, f"Invalid '{structured.param}'{where}: {exc}") from None
    except RecursionError:
        raise bad_request(structured.param, f"'{structured.param}' nests too deeply.") from None
    return replace(params, structured=grammar)
