"""Chat prompts in which a client's text can never become control tokens.

A rendered chat prompt mixes two kinds of text: what the template writes (`<|im_start|>`, role
headers, `<|im_end|>`) and what clients sent (message content, names, tool calls and results).
Encoding the whole string would turn special-token text inside a message into real control
tokens, so a user could close their own turn and open a forged system turn. Here:

- A prompt whose client strings hold no special-token text (nearly every request) is rendered
  and encoded as one string, exactly as before.
- Otherwise the chat is rendered a second time with each client string replaced by a unique
  ASCII marker. Putting the strings back where the markers stand must give the real render
  (it does for templates that write content as it is); the markers then say where client text
  lies. The special tokens outside those spans are the template's and become control tokens;
  the text between them, client text included, is encoded with special tokens read as text.
  Splitting only where the tokenizer itself splits (at special tokens) keeps every other token
  boundary, and so token counts and cached prefixes, as they would be.
- A template that transforms or inspects content (trims it, branches on it) fails that check;
  then each special-token text in client strings is broken with U+2060 (WORD JOINER) after its
  first character before rendering, so it cannot match.

Tokens marked special are the ones protected; non-special added tokens (e.g. Qwen's
`<tool_call>`) stay single tokens in content, as in Hugging Face tokenizers.
"""

from __future__ import annotations

import bisect
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WORD_JOINER = "\u2060"
# Fields whose string values are the template's vocabulary, not client text.
_STRUCTURAL_KEYS = frozenset({"role", "type"})


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]


def map_client_strings(value: Any, fn: Callable[[str], str], key: str | None = None) -> Any:
    """A copy of messages with fn applied to every client string (keys and roles are kept)."""
    if isinstance(value, str):
        return value if key in _STRUCTURAL_KEYS else fn(value)
    if isinstance(value, dict):
        return {k: map_client_strings(v, fn, k) for k, v in value.items()}
    if isinstance(value, list):
        return [map_client_strings(v, fn, key) for v in value]
    return value


class SpecialTokenText:
    """Finds the text of special tokens in strings (longest match first, as the tokenizer does)."""

    def __init__(self, tokens: dict[str, int], rstrip: set[str], lstrip: set[str]) -> None:
        self.ids = tokens
        self.rstrip = rstrip
        self.lstrip = lstrip
        names = sorted(tokens, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, names))) if names else None

    def occurs_in(self, value: Any) -> bool:
        found = False

        def check(text: str) -> str:
            nonlocal found
            found = found or self.pattern.search(text) is not None
            return text

        if self.pattern is not None:
            map_client_strings(value, check)
        return found

    def break_up(self, text: str) -> str:
        return self.pattern.sub(lambda m: m.group(0)[0] + WORD_JOINER + m.group(0)[1:], text)


def marked_render(
    render: Callable[[Any], str], messages: list[dict], real_text: str
) -> list[tuple[int, int]] | None:
    """Spans [start, end) of client text in real_text, or None when the template does not
    write client strings as they are (putting them back into a marked render differs)."""
    nonce = secrets.token_hex(8)
    pieces: list[str] = []

    def mark(text: str) -> str:
        pieces.append(text)
        return f"NSX{nonce}Q{len(pieces) - 1}Q"

    marked = render(map_client_strings(messages, mark))
    marker = re.compile(f"NSX{nonce}Q(\\d+)Q")
    spans: list[tuple[int, int]] = []
    parts: list[str] = []
    length = 0
    last = 0
    for match in marker.finditer(marked):
        template_text = marked[last : match.start()]
        parts.append(template_text)
        length += len(template_text)
        piece = pieces[int(match.group(1))]
        parts.append(piece)
        spans.append((length, length + len(piece)))
        length += len(piece)
        last = match.end()
    parts.append(marked[last:])
    if "".join(parts) != real_text:
        return None
    return spans


def encode_with_spans(
    text: str,
    spans: list[tuple[int, int]],
    special: SpecialTokenText,
    encode_as_text: Callable[[str], list[int]],
) -> list[int]:
    """Special tokens outside `spans` become their ids; all other text is encoded as text."""
    starts = [s for s, _ in spans]
    ids: list[int] = []
    segment_start = 0
    for match in special.pattern.finditer(text):
        at = bisect.bisect_right(starts, match.start()) - 1
        if at >= 0 and match.start() < spans[at][1]:
            continue  # inside client text
        segment = text[segment_start : match.start()]
        if match.group(0) in special.lstrip:
            segment = segment.rstrip()
        if segment:
            ids.extend(encode_as_text(segment))
        ids.append(special.ids[match.group(0)])
        segment_start = match.end()
        if match.group(0) in special.rstrip:
            while segment_start < len(text) and text[segment_start].isspace():
                segment_start += 1
    if segment_start < len(text):
        ids.extend(encode_as_text(text[segment_start:]))
    return ids


def encode_chat_prompt(
    render: Callable[[list[dict], list[dict] | None], str],
    messages: list[dict],
    tools: list[dict] | None,
    special: SpecialTokenText,
    encode: Callable[[str], list[int]],
    encode_as_text: Callable[[str], list[int]],
) -> ChatPrompt:
    """Render (messages, tools) and encode the prompt so client text stays text.

    `encode` is the tokenizer's ordinary encoding (special-token text becomes control tokens),
    `encode_as_text` the one that reads special-token text as text.
    """
    if tools is not None and special.occurs_in(tools):
        tools = map_client_strings(tools, special.break_up)
    text = render(messages, tools)
    if not special.occurs_in(messages):
        return ChatPrompt(text, encode(text))
    spans = marked_render(lambda chat: render(chat, tools), messages, text)
    if spans is None:  # the template transforms content: break the token texts up instead
        text = render(map_client_strings(messages, special.break_up), tools)
        return ChatPrompt(text, encode(text))
    return ChatPrompt(text, encode_with_spans(text, spans, special, encode_as_text))
