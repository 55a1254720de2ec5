"""Chat templates: Hugging Face's jinja conventions inside an immutable sandbox.

Templates ship with model files and are untrusted code. They are rendered by jinja2's
``ImmutableSandboxedEnvironment`` with the globals and filters Hugging Face templates expect
(``raise_exception``, ``strftime_now``, ``tojson``, ``{% generation %}``, loop controls). Every
failure, including a sandbox violation, becomes :class:`model.errors.TemplateError`.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from model.errors import TemplateError

# Largest string/list a template may build with `*` (guards memory against hostile templates).
MAX_REPEAT_LEN = 1 << 20
MAX_POWER_EXPONENT = 64
# Appended to the final message's content to find where it ends after rendering.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class _Sandbox(ImmutableSandboxedEnvironment):
    """No mutation of inputs, no unsafe attributes, no huge repeats or powers."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # Jinja returns a silent undefined here; a template probing internals is an error.
        raise SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__} is unsafe"
        )

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, count in ((left, right), (right, left)):
                is_repeat = isinstance(seq, (str, list, tuple)) and isinstance(count, int)
                if is_repeat and len(seq) * count > MAX_REPEAT_LEN:
                    raise SecurityError("the template tried to build a too large value")
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_POWER_EXPONENT:
            raise SecurityError("the template tried to compute a too large power")
        return super().call_binop(context, operator, left, right)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
    when serving it just renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _TemplateDict:
    """``dict(...)`` and ``dict.fromkeys(...)`` without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore names (no reaching into internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (mirrors Namespace's signature)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise TemplateError(f"chat template error: {message}")


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; Hugging Face templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=32)
def compile_template(source: str) -> jinja2.Template:
    """Compile (and cache) a chat template; raises TemplateError on a syntax error."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template does not compile: {e}") from e


def render_chat_template(
    source: str,
    messages: list[dict],
    *,
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    variables: dict[str, Any] | None = None,
) -> str:
    """Render ``source`` like ``transformers``' ``apply_chat_template(..., tokenize=False)``.

    ``variables`` are extra template variables (special tokens such as ``bos_token``, then
    request extras such as ``enable_thinking``; later ones win). With ``continue_final_message``
    the generation prompt is left out and the text is cut right after the final message's
    content, so the model continues that message.
    """
    template = compile_template(source)
    chat = _alias_reasoning(_plain(messages))
    for message in chat:
        if not isinstance(message, dict):
            raise TemplateError(f"chat messages must be objects, got {type(message).__name__}")
    final_text = None
    if continue_final_message:
        if not chat:
            raise TemplateError("continue_final_message needs at least one message")
        final_text = _tag_final_message(chat[-1])
        add_generation_prompt = False
    try:
        # The chat's own arguments win over a variable of the same name.
        context = {
            **_plain(variables or {}),
            "messages": chat,
            "tools": _plain(tools),
            "documents": _plain(documents),
            "add_generation_prompt": add_generation_prompt,
        }
        rendered = template.render(context)
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"chat template tried to leave its sandbox: {e}") from e
    except jinja2.TemplateError as e:
        raise TemplateError(f"chat template failed: {e}") from e
    except Exception as e:  # untrusted code: any failure is the template's
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    if final_text is not None:
        rendered = _cut_after_final_message(rendered, final_text)
    return rendered


def _tag_final_message(message: dict) -> str:
    """Append the marker to the final message's text; returns that text (before marking)."""
    content = message.get("content")
    if isinstance(content, str):
        message["content"] = content + _CONTINUE_TAG
        return content
    if isinstance(content, list):
        for block in reversed(content):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                text = block["text"]
                block["text"] = text + _CONTINUE_TAG
                return text
    raise TemplateError("continue_final_message: the final message has no text to continue")


def _cut_after_final_message(rendered: str, final_text: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if tag not in rendered or final_text.strip() not in rendered:
        raise TemplateError(
            "continue_final_message: the chat template does not render the final message as is"
        )
    at = rendered.rindex(tag)
    if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    # The template trimmed trailing whitespace of the content (and so of the marker).
    return rendered[:at].rstrip()


def _alias_reasoning(chat: list) -> list:
    """Templates read the reasoning of earlier turns under different names; offer all of them."""
    aliased = []
    for message in chat:
        if isinstance(message, dict):
            reasoning = next(
                (message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None
            )
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        aliased.append(message)
    return aliased


def _plain(value: Any) -> Any:
    """A copy made only of JSON types, so a template never sees methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"
