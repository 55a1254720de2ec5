"""GGUF (llama.cpp) -> Hugging Face folder: config, bf16 safetensors, tokenizer, generation config.

Only the Llama architecture is handled (llama.cpp also files Mistral-style models under it).
Tensors are dequantized with ``gguf.quants``; the tokenizer is rebuilt with ``tokenizers``
from ``tokenizer.ggml.*`` (see :mod:`model.gguf_tokenizer`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from model.default_model import ConversionError

# GGUF tensor name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def read_field(reader: Any, key: str, default: Any = None) -> Any:
    """A metadata value as plain Python (str, int, float, bool or list of those)."""
    from gguf import GGUFValueType

    field = reader.fields.get(key)
    if field is None:
        return default
    main = field.types[0]
    if main == GGUFValueType.ARRAY:
        if field.types[-1] == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8", errors="replace") for i in field.data]
        if not field.data:
            return []
        return np.concatenate([field.parts[i] for i in field.data]).tolist()
    if main == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
    return field.parts[field.data[0]].tolist()[0]


def write_hf_model(gguf_path: Path, out_dir: Path, say: Callable[[str], None]) -> None:
    """Write the whole Hugging Face folder for ``gguf_path`` into the (empty) ``out_dir``."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:
        raise ConversionError(f"{gguf_path}: not a readable GGUF file ({e})") from e
    arch = read_field(reader, "general.architecture")
    if arch != "llama":
        raise ConversionError(
            f"{gguf_path.name}: architecture {arch!r} is not supported (only llama)"
        )

    tensors = {t.name: t for t in reader.tensors}
    config = _build_config(reader, tensors, gguf_path.name)
    tokenizer, tokenizer_config, eos_ids = _build_tokenizer(reader, config, gguf_path.name)
    generation_config = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids,
    }
    if config.get("pad_token_id") is not None:
        generation_config["pad_token_id"] = config["pad_token_id"]

    state = _convert_tensors(tensors, config, gguf_path.name, say)
    from safetensors.torch import save_file

    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save(str(out_dir / "tokenizer.json"))
    _write_json(out_dir / "tokenizer_config.json", tokenizer_config)
    _write_json(out_dir / "config.json", config)
    _write_json(out_dir / "generation_config.json", generation_config)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build_config(reader: Any, tensors: dict, file_name: str) -> dict:
    def get(key: str, default: Any = None, required: bool = False) -> Any:
        value = read_field(reader, f"llama.{key}", default)
        if value is None and required:
            raise ConversionError(f"{file_name}: metadata llama.{key} is missing")
        return value

    if "token_embd.weight" not in tensors:
        raise ConversionError(f"{file_name}: tensor token_embd.weight is missing")
    hidden = int(get("embedding_length", required=True))
    num_heads = int(get("attention.head_count", required=True))
    num_kv_heads = get("attention.head_count_kv", num_heads)
    if isinstance(num_kv_heads, list):  # per-layer counts: only uniform ones make a Llama
        if len(set(num_kv_heads)) != 1:
            raise ConversionError(f"{file_name}: per-layer KV head counts are not supported")
        num_kv_heads = num_kv_heads[0]
    head_dim = int(get("attention.key_length", hidden // num_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConversionError(
            f"{file_name}: partial rotary ({rope_dim} of {head_dim}) not supported"
        )
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise ConversionError(f"{file_name}: value head size differs from key head size")
    if read_field(reader, "llama.expert_count", 0):
        raise ConversionError(f"{file_name}: mixture-of-experts models are not supported")
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    context_length = int(get("context_length", required=True))
    # Embedding rows (numpy order [vocab, hidden]) are the model's true vocabulary size.
    vocab_size = int(tensors["token_embd.weight"].shape[-1])

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor", 1.0))}
    elif scaling_type not in (None, "none"):
        raise ConversionError(f"{file_name}: rope scaling {scaling_type!r} is not supported")
    if "rope_freqs.weight" in tensors:
        factors = _dequantize(tensors["rope_freqs.weight"], file_name).reshape(-1)
        rope_scaling = _llama3_rope_scaling(factors, rope_theta, head_dim, file_name)

    def token_id(key: str) -> int | None:
        value = read_field(reader, f"tokenizer.ggml.{key}")
        return int(value) if value is not None else None

    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length", required=True)),
        "num_hidden_layers": int(get("block_count", required=True)),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(num_kv_heads),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": context_length,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": 0.02,
        "pretraining_tp": 1,
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
    }


def _f32(value: float) -> float:
    """GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the short spelling."""
    return float(str(np.float32(value)))


def _llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, file_name: str) -> dict:
    """Recover Llama 3.1-style ``rope_scaling`` from the per-frequency factors llama.cpp stores."""
    factor = float(factors.max())
    candidate = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    low_wavelen = candidate["original_max_position_embeddings"] / candidate["low_freq_factor"]
    high_wavelen = candidate["original_max_position_embeddings"] / candidate["high_freq_factor"]
    expected = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(factor)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / factor + smooth))
    if len(expected) != factors.size or not np.allclose(factors, expected, rtol=1e-3):
        raise ConversionError(f"{file_name}: rope_freqs.weight does not match Llama 3 rope scaling")
    return candidate


def _dequantize(tensor: Any, file_name: str) -> np.ndarray:
    """float32 array in numpy order (GGUF's dims reversed: [rows, cols] = HF [out, in])."""
    from gguf import GGMLQuantizationType, quants

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        values = np.asarray(tensor.data, dtype=np.float32)
    else:
        try:
            values = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(
                f"{file_name}: tensor {tensor.name} has unsupported type {tensor.tensor_type.name}"
            ) from e
    # A copy: the reader's arrays are read-only views of the memory-mapped file.
    return np.array(values, dtype=np.float32, copy=True).reshape(shape)


def unpermute_rope_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (interleaved RoPE pairs) for rotate-half RoPE.

    llama.cpp stores each head's rows as [head_dim/2, 2] (pairs next to each other);
    Hugging Face wants [2, head_dim/2] (first halves, then second halves).
    """
    rows = weight.shape[0]
    assert rows % (2 * num_heads) == 0, (weight.shape, num_heads)
    half = rows // num_heads // 2
    rest = weight.shape[1:]
    # (n_head, head_dim/2, 2, *rest) -> (n_head, 2, head_dim/2, *rest)
    return weight.reshape(num_heads, half, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def _convert_tensors(
    tensors: dict, config: dict, file_name: str, say: Callable[[str], None]
) -> dict[str, Any]:
    """HF name -> bf16 torch tensor (converted one at a time to bound peak memory)."""
    import torch

    num_layers = config["num_hidden_layers"]
    expected = {"model.embed_tokens.weight", "model.norm.weight"}
    if not config["tie_word_embeddings"]:
        expected.add("lm_head.weight")
    for i in range(num_layers):
        expected.update(f"model.layers.{i}.{name}.weight" for name in _LAYER_TENSORS.values())

    state: dict[str, torch.Tensor] = {}
    names = [n for n in tensors if n != "rope_freqs.weight"]
    for done, name in enumerate(names, start=1):
        hf_name, num_heads = _hf_name(name, config, file_name)
        values = _dequantize(tensors[name], file_name)
        if num_heads:
            values = unpermute_rope_rows(values, num_heads)
        state[hf_name] = torch.from_numpy(values).to(torch.bfloat16)
        if done % max(1, len(names) // 10) == 0 or done == len(names):
            say(f"converted {done}/{len(names)} tensors")
    missing = sorted(expected - state.keys())
    if missing:
        raise ConversionError(f"{file_name}: tensor for {missing[0]} is missing")
    return state


def _hf_name(name: str, config: dict, file_name: str) -> tuple[str, int]:
    """HF tensor name, and the head count to un-permute rows with (0 = leave as is)."""
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name], 0
    match = _LAYER_RE.fullmatch(name)
    if match is None or match.group(2) not in _LAYER_TENSORS:
        raise ConversionError(f"{file_name}: unexpected tensor {name} for a llama model")
    layer, kind, suffix = int(match.group(1)), match.group(2), match.group(3)
    if layer >= config["num_hidden_layers"]:
        raise ConversionError(f"{file_name}: tensor {name} is beyond block_count")
    num_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}.{suffix}", num_heads.get(kind, 0)


# ---------------------------------------------------------------------------------------------
# Tokenizer: tokenizer.ggml.* -> tokenizer.json (+ tokenizer_config.json)

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


def _build_tokenizer(reader: Any, config: dict, file_name: str) -> tuple[Any, dict, list[int]]:
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
