"""The model's tokenizer: encode/decode, token bytes, stop tokens and the chat template.

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` loaded from a Hugging Face model folder
(tokenizer.json, tokenizer_config.json, generation_config.json, config.json). Chats are rendered
with chat_template.py and encoded by ``encode_chat`` so client text stays text (chat_prompt.py);
detokenizer.py and stop_strings.py turn sampled ids back into text deltas.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from model.errors import ModelLoadError, TemplateError
from model.text.chat_prompt import ChatPrompt, SpecialTokenText, encode_chat_prompt
from model.text.chat_template import compile_template, render_chat_template
from model.text.tool_prompt import (
    TOOL_PROMPT_MODES,
    needs_tool_prompt,
    template_renders_tools,
    with_tool_prompt,
)

logger = logging.getLogger(__name__)


_SPM_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: printable character -> the byte it stands for."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _read_json(path: Path, required: bool) -> dict:
    if not path.is_file():
        if required:
            raise ModelLoadError(f"{path.name}: missing in {path.parent}")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path.name}: cannot be read ({e})") from e
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path.name}: expected a JSON object")
    return data


def _token_content(value: Any) -> str | None:
    """tokenizer_config stores special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _load_chat_template(model_dir: Path, tokenizer_config: dict) -> str | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(model_dir / "chat_template.json", required=False).get("chat_template")
    if template is None:
        template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default", next(iter(named.values()), None))
    return template if isinstance(template, str) else None


class Tokenizer:
    """Encode/decode with ``tokenizers`` plus the model's chat template and stop tokens."""

    def __init__(
        self,
        backend: Any,
        tokenizer_config: dict | None = None,
        generation_config: dict | None = None,
        model_config: dict | None = None,
        chat_template: str | None = None,
        is_byte_level: bool = True,
    ) -> None:
        tokenizer_config = tokenizer_config or {}
        self._backend = backend
        self._is_byte_level = is_byte_level
        self.chat_template = chat_template
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token: str | None = _token_content(tokenizer_config.get("bos_token"))
        self.eos_token: str | None = _token_content(tokenizer_config.get("eos_token"))
        self._template_tokens = {
            name: _token_content(tokenizer_config.get(name))
            for name in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        extra = tokenizer_config.get("additional_special_tokens")
        if isinstance(extra, list):
            self._template_tokens["additional_special_tokens"] = [
                c for c in map(_token_content, extra) if c is not None
            ]

        added = backend.get_added_tokens_decoder()
        self._added_text = {i: t.content for i, t in added.items()}
        # The ids decode(skip_special_tokens=True) drops.
        self.skipped_special_ids = frozenset(i for i, t in added.items() if t.special)
        special = {i: t for i, t in added.items() if t.special}
        self._special_text = SpecialTokenText(
            {t.content: i for i, t in special.items()},
            rstrip={t.content for t in special.values() if t.rstrip},
            lstrip={t.content for t in special.values() if t.lstrip},
        )
        self._text_backend: Any = None  # a copy that reads special-token text as text
        self.all_special_ids: set[int] = set(self.skipped_special_ids)
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            token_id = self.token_to_id(self._template_tokens.get(name))
            if token_id is not None:
                self.all_special_ids.add(token_id)

        eos = set(_ids((generation_config or {}).get("eos_token_id")))
        eos |= set(_ids((model_config or {}).get("eos_token_id")))
        if (eos_id := self.token_to_id(self.eos_token)) is not None:
            eos.add(eos_id)
        self.eos_token_ids: set[int] = eos
        self._byte_cache: dict[int, bytes] = {}
        self._byte_decoder = _byte_decoder() if is_byte_level else {}
        self.tool_prompt_mode = "auto"
        self._renders_tools: bool | None = None  # probed on first use

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """Load from a Hugging Face model folder; raises ModelLoadError naming the bad file."""
        from tokenizers import Tokenizer as BackendTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"tokenizer.json: missing in {model_dir}")
        try:
            text = path.read_text(encoding="utf-8")
            backend = BackendTokenizer.from_str(text)
            decoder = json.loads(text).get("decoder") or {}
        except Exception as e:  # the Rust side raises plain Exceptions on malformed files
            raise ModelLoadError(f"tokenizer.json: cannot be loaded ({e})") from e
        tokenizer_config = _read_json(model_dir / "tokenizer_config.json", required=False)
        template = _load_chat_template(model_dir, tokenizer_config)
        if template is not None:
            try:
                compile_template(template)
            except TemplateError as e:
                logger.warning("%s: chat requests will fail: %s", model_dir, e)
        return cls(
            backend,
            tokenizer_config=tokenizer_config,
            generation_config=_read_json(model_dir / "generation_config.json", required=False),
            model_config=_read_json(model_dir / "config.json", required=False),
            chat_template=template,
            is_byte_level='"ByteLevel"' in json.dumps(decoder),
        )

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_as_text(self, text: str) -> list[int]:
        """Encode with special-token text read as ordinary text (never a control token)."""
        if self._text_backend is None:
            from tokenizers import Tokenizer as BackendTokenizer

            self._text_backend = BackendTokenizer.from_str(self._backend.to_str())
            self._text_backend.encode_special_tokens = True
        return self._text_backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    def token_text(self, token_id: int) -> str:
        """The text of one token alone (may be U+FFFD for part of a multi-byte character)."""
        return self._backend.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes one token stands for (exact even for part of a UTF-8 character)."""
        cached = self._byte_cache.get(token_id)
        if cached is not None:
            return cached
        if token_id in self._added_text:
            value = self._added_text[token_id].encode("utf-8")
        else:
            piece = self._backend.id_to_token(token_id) or ""
            if self._is_byte_level and all(c in self._byte_decoder for c in piece):
                value = bytes(self._byte_decoder[c] for c in piece)
            elif (match := _SPM_BYTE.fullmatch(piece)) is not None:
                value = bytes([int(match.group(1), 16)])
            else:
                value = piece.replace("\u2581", " ").encode("utf-8")
        self._byte_cache[token_id] = value
        return value

    def apply_chat_template(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        **extra: Any,
    ) -> str:
        """Render the chat as the prompt text (like HF ``apply_chat_template(tokenize=False)``).

        ``extra`` become template variables (e.g. ``enable_thinking``) and may override the
        special tokens. Raises TemplateError when the template fails or misbehaves.
        """
        return self.render_chat(
            messages, tools, add_generation_prompt, continue_final_message, extra
        )

    def render_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None,
        add_generation_prompt: bool,
        continue_final_message: bool,
        template_kwargs: dict[str, Any] | None,
    ) -> str:
        """apply_chat_template with the extra variables as a dict (any names, no collisions)."""
        if self.chat_template is None:
            raise TemplateError("this model has no chat template")
        variables = {k: v for k, v in self._template_tokens.items() if v is not None}
        variables.update(template_kwargs or {})
        return render_chat_template(
            self.chat_template,
            messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            variables=variables,
        )

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes `tools` into the prompt (model/text/tool_prompt.py)."""
        if self._renders_tools is None:
            self._renders_tools = self.chat_template is not None and template_renders_tools(
                lambda chat, tools: self.render_chat(chat, tools, True, False, None)
            )
        return self._renders_tools

    def set_tool_prompt(self, mode: str) -> None:
        """ "auto": the Hermes tool prompt when the template does not render tools; "hermes":
        always instead of the template's own; "none": never (tools reach the template only)."""
        if mode not in TOOL_PROMPT_MODES:
            raise ValueError(f"tool prompt mode must be one of {', '.join(TOOL_PROMPT_MODES)}")
        self.tool_prompt_mode = mode

    @property
    def uses_tool_prompt(self) -> bool:
        if self.tool_prompt_mode == "auto":
            return not self.renders_tools
        return self.tool_prompt_mode == "hermes"

    def encode_chat(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        template_kwargs: dict[str, Any] | None = None,
        add_special_tokens: bool = False,
    ) -> ChatPrompt:
        """Render the chat and encode it; client text never becomes control tokens.

        Only what the template writes may be a special token (model/text/chat_prompt.py).
        `template_kwargs` are extra template variables. Raises TemplateError.
        """

        def render(chat: list[dict], chat_tools: list[dict] | None) -> str:
            return self.render_chat(
                chat, chat_tools, add_generation_prompt, continue_final_message, template_kwargs
            )

        if self.uses_tool_prompt and needs_tool_prompt(messages, tools):
            messages, tools = with_tool_prompt(messages, tools), None

        prompt = encode_chat_prompt(
            render,
            messages,
            tools,
            self._special_text,
            lambda text: self.encode(text, add_special_tokens=False),
            self.encode_as_text,
        )
        if add_special_tokens:
            prefix = self.encode("", add_special_tokens=True)
            return ChatPrompt(prompt.text, prefix + prompt.token_ids)
        return prompt
