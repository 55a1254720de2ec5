"""GGUF vocabulary -> ``tokenizers`` tokenizer + tokenizer_config (byte-level BPE, SentencePiece).

Rebuilds tokenizer.json (+ tokenizer_config.json) from ``tokenizer.ggml.*``: ``gpt2``
vocabularies become byte-level BPE, ``llama`` (SentencePiece) ones BPE with byte fallback.
Also holds :func:`read_field`, the GGUF metadata reader :mod:`model.gguf_convert` shares
(it lives here so that imports run one way: gguf_convert -> gguf_tokenizer).
"""

from __future__ import annotations

from typing import Any

from model.errors import ConversionError
from model.hub.gguf.reader import read_field

# Pre-tokenizer split patterns by ``tokenizer.ggml.pre`` (the regexes the vocabularies were
# trained with; the same ones llama.cpp uses).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-bpe", "llama-v3", "smaug-bpe", "dbrx", "falcon3"), _LLAMA3_SPLIT
    ),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
}


# Special tokens that end an assistant turn: stop tokens when the chat template uses them.
_TURN_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def build_tokenizer(reader: Any, config: dict, file_name: str) -> tuple[Any, dict, list[int]]:
    """(tokenizers.Tokenizer, tokenizer_config dict, EOS ids for generation_config)."""
    from tokenizers import AddedToken, processors

    model_type = read_field(reader, "tokenizer.ggml.model")
    tokens = read_field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ConversionError(f"{file_name}: metadata tokenizer.ggml.tokens is missing")
    types = read_field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = read_field(reader, "tokenizer.ggml.merges")
    is_spm = model_type == "llama"
    if model_type == "gpt2":
        tokenizer = _byte_level_bpe(tokens, types, merges, read_field(reader, "tokenizer.ggml.pre"))
    elif is_spm:
        add_space_prefix = bool(read_field(reader, "tokenizer.ggml.add_space_prefix", True))
        scores = read_field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens)
        unk_id = read_field(reader, "tokenizer.ggml.unknown_token_id")
        tokenizer = _sentencepiece_bpe(tokens, scores, merges, unk_id, add_space_prefix)
    else:
        raise ConversionError(f"{file_name}: tokenizer model {model_type!r} is not supported")

    special = [i for i, t in enumerate(types) if t == _CONTROL]
    user_defined = [i for i, t in enumerate(types) if t == _USER_DEFINED]
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i in special]
    )
    tokenizer.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i in user_defined]
    )

    def token_of(key: str) -> str | None:
        token_id = config.get(key)
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    bos = token_of("bos_token_id")
    add_bos = bool(read_field(reader, "tokenizer.ggml.add_bos_token", is_spm)) and bos is not None
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, config["bos_token_id"])],
        )
    elif not is_spm:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)

    chat_template = read_field(reader, "tokenizer.chat_template")
    unk_id = read_field(reader, "tokenizer.ggml.unknown_token_id")
    tokenizer_config = {
        "add_bos_token": add_bos,
        "add_eos_token": bool(read_field(reader, "tokenizer.ggml.add_eos_token", False)),
        "added_tokens_decoder": {
            str(i): {
                "content": tokens[i],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": types[i] == _CONTROL,
            }
            for i in sorted(special + user_defined)
        },
        "bos_token": bos,
        "eos_token": token_of("eos_token_id"),
        "pad_token": token_of("pad_token_id"),
        "unk_token": tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    if chat_template:
        tokenizer_config["chat_template"] = chat_template

    eos_ids: list[int] = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        value = read_field(reader, f"tokenizer.ggml.{key}")
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    for i in special:
        if (
            tokens[i] in _TURN_END_TOKENS
            and tokens[i] in (chat_template or "")
            and i not in eos_ids
        ):
            eos_ids.append(i)
    return tokenizer, tokenizer_config, eos_ids


def _first_index_vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)  # a duplicated spelling keeps its first id
    return vocab


def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[str] | None, pre: str | None):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    if not merges:
        raise ConversionError("byte-level BPE tokenizer without tokenizer.ggml.merges")
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = set(ByteLevel.alphabet())
    # Ordinary tokens are spelled in the byte alphabet; a few files store raw text instead.
    spelled = [
        t if types[i] in (_CONTROL, _USER_DEFINED) or set(t) <= alphabet else _byte_spelling(t)
        for i, t in enumerate(tokens)
    ]
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tokenizer = Tokenizer(
        models.BPE(
            vocab=_first_index_vocab(spelled), merges=pairs, fuse_unk=False, byte_fallback=False
        )
    )
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    elif pre in _SPLITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:  # "default", "gpt2" and unknown ones: GPT-2's own split
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_spelling(text: str) -> str:
    from tokenizers.pre_tokenizers import ByteLevel

    return "".join(
        s for s, _ in ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    )


def _sentencepiece_bpe(
    tokens: list[str],
    scores: list[float],
    merges: list[str] | None,
    unk_id: int | None,
    add_space_prefix: bool,
):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = _first_index_vocab(tokens)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, scores, vocab)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    scheme = "first" if add_space_prefix else "never"
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme=scheme, split=False
    )
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _merges_from_scores(
    tokens: list[str], scores: list[float], vocab: dict[str, int]
) -> list[tuple[str, str]]:
    """SentencePiece files carry scores, not merges: a pair merges with its result's score."""
    ranked = []
    for piece, score in zip(tokens, scores, strict=False):
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((left, right, score) for left, right in local)
    ranked.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in ranked]
