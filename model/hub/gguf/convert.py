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

from model.errors import ConversionError
from model.hub.gguf.reader import read_field
from model.hub.gguf.tokenizer import build_tokenizer

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
# Written into the converted folder: which GGUF it came from and its weights' types.
GGUF_SOURCE_FILE = "gguf_source.json"


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
    tokenizer, tokenizer_config, eos_ids = build_tokenizer(reader, config, gguf_path.name)
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
    weight_types = linear_weight_types(tensors)
    source = {
        "file": gguf_path.name,
        "weight_types": weight_types,
        "quantization": quantization_for(weight_types),
    }
    _write_json(out_dir / GGUF_SOURCE_FILE, source)


def linear_weight_types(tensors: dict) -> dict[str, int]:
    """How many of the layers' 2-D weights (the linear layers) have each GGML type."""
    counts: dict[str, int] = {}
    for name, tensor in tensors.items():
        if name.startswith("blk.") and name.endswith(".weight") and len(tensor.shape) == 2:
            kind = tensor.tensor_type.name
            counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def quantization_for(weight_types: dict[str, int]) -> str:
    """The weight-only quantization that keeps a GGUF's own precision: int4 for 2-4 bit
    blocks (Q4_0, Q4_1, Q4_K, Q3_K, Q2_K), int8 for 5-8 bit ones (Q5_*, Q6_K, Q8_0), none for
    float weights. The most common type of the linear layers decides."""
    if not weight_types:
        return "none"
    kind = max(weight_types, key=weight_types.__getitem__)
    bits = re.match(r"I?Q(\d)", kind)
    if bits is None:
        return "none"
    return "int4" if int(bits.group(1)) <= 4 else "int8"


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
