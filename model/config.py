"""ModelConfig: the architecture facts of a Hugging Face model folder, read from config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.errors import ModelLoadError

logger = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)
# Fallback when config.json has no "architectures" list.
_MODEL_TYPE_TO_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
SUPPORTED_ROPE_TYPES = ("linear", "llama3")
_ROPE_REQUIRED_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
DISK_DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ModelConfig:
    """Architecture of one decoder-only model; serves Llama, Mistral, Qwen2 and Qwen3.

    `rope_scaling` is None for plain RoPE, else a dict with "rope_type" ("linear" or "llama3")
    and that type's parameters in Hugging Face naming.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    torch_dtype: str
    bos_token_id: int | None
    eos_token_id: int | list[int] | None

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {self.architecture!r} "
                f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        if self.torch_dtype not in DISK_DTYPES:
            raise ValueError(f"torch_dtype must be one of {DISK_DTYPES}, got {self.torch_dtype!r}")
        if self.rope_scaling is not None:
            _validate_rope_scaling(self.rope_scaling)

    @property
    def num_kv_groups(self) -> int:
        """Query heads per key/value head (GQA group size)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 has biases on q/k/v only; Llama-style attention_bias also covers o_proj."""
        return self.attention_bias and self.architecture != "Qwen2ForCausalLM"

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read `model_dir/config.json`; raises ModelLoadError naming the file and the problem.

        Sliding-window attention (Mistral v0.1, Qwen with use_sliding_window) is served as full
        attention: when the window is shorter than max_position_embeddings, the latter is lowered
        to the window, so no sequence ever gets long enough for the two to differ.
        """
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"{path}: not found (is {model_dir} a model folder?)")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{path}: cannot read JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path}: expected a JSON object at the top level")
        try:
            return cls(**_parse(raw))
        except (ValueError, TypeError, KeyError) as exc:
            message = str(exc).strip("'\"") if isinstance(exc, KeyError) else str(exc)
            if isinstance(exc, KeyError):
                message = f"missing required field {message!r}"
            raise ModelLoadError(f"{path}: {message}") from None


def _validate_rope_scaling(rope_scaling: dict) -> None:
    rope_type = rope_scaling.get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(
            f"unsupported rope_scaling type {rope_type!r} "
            f"(supported: default, {', '.join(SUPPORTED_ROPE_TYPES)})"
        )
    for key in _ROPE_REQUIRED_KEYS[rope_type]:
        value = rope_scaling.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ValueError(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")
    if (
        rope_type == "llama3"
        and rope_scaling["high_freq_factor"] <= rope_scaling["low_freq_factor"]
    ):
        raise ValueError("rope_scaling high_freq_factor must exceed low_freq_factor")
    partial = rope_scaling.get("partial_rotary_factor", 1.0)
    if partial != 1.0:
        raise ValueError(f"partial_rotary_factor {partial!r} is not supported")


def _architecture(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures")
    if isinstance(architectures, list) and architectures:
        for name in architectures:
            if name in SUPPORTED_ARCHITECTURES:
                return name
        return str(architectures[0])
    model_type = raw.get("model_type")
    if model_type in _MODEL_TYPE_TO_ARCHITECTURE:
        return _MODEL_TYPE_TO_ARCHITECTURE[model_type]
    raise ValueError(
        f"unknown architecture (architectures={architectures!r}, model_type={model_type!r})"
    )


def _rope(raw: dict[str, Any]) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the transformers 5 `rope_parameters` layout or the
    older top-level `rope_theta` + `rope_scaling` layout."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    merged: dict[str, Any] = {}
    for source in (params, scaling):
        if source is None:
            continue
        if not isinstance(source, dict):
            raise ValueError(f"rope_parameters/rope_scaling must be an object, got {source!r}")
        if any(isinstance(v, dict) for v in source.values()):
            raise ValueError("per-layer-type rope_parameters are not supported")
        merged.update(source)
    rope_theta = merged.pop("rope_theta", raw.get("rope_theta", 10000.0))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type == "default":
        partial = merged.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ValueError(f"partial_rotary_factor {partial!r} is not supported")
        return rope_theta, None
    return rope_theta, {"rope_type": rope_type, **merged}


def _sliding_window(raw: dict[str, Any], architecture: str) -> int | None:
    window = raw.get("sliding_window")
    if window is None:
        return None
    if architecture == "MistralForCausalLM":
        return int(window)
    if architecture in ("Qwen2ForCausalLM", "Qwen3ForCausalLM") and raw.get("use_sliding_window"):
        return int(window)
    return None


def _parse(raw: dict[str, Any]) -> dict[str, Any]:
    architecture = _architecture(raw)
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported architecture {architecture!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ValueError(f"hidden_act {hidden_act!r} is not supported (only silu)")
    if raw.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    num_heads = raw["num_attention_heads"]
    hidden_size = raw["hidden_size"]
    head_dim = raw.get("head_dim")
    if head_dim is None:
        for name, value in (("hidden_size", hidden_size), ("num_attention_heads", num_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if hidden_size % num_heads:
            raise ValueError(
                f"hidden_size {hidden_size} is not a multiple of num_attention_heads {num_heads}"
            )
        head_dim = hidden_size // num_heads
    rope_theta, rope_scaling = _rope(raw)
    max_position_embeddings = raw.get("max_position_embeddings", 2048)
    window = _sliding_window(raw, architecture)
    if (
        window is not None
        and isinstance(max_position_embeddings, int)
        and window < max_position_embeddings
    ):
        logger.info(
            "sliding_window=%d < max_position_embeddings=%d: serving at most %d positions "
            "with full attention",
            window,
            max_position_embeddings,
            window,
        )
        max_position_embeddings = window
    if architecture == "Qwen2ForCausalLM":
        attention_bias = True
    else:
        attention_bias = bool(raw.get("attention_bias", False))
    torch_dtype = raw.get("torch_dtype") or raw.get("dtype") or "float32"
    return {
        "architecture": architecture,
        "vocab_size": raw["vocab_size"],
        "hidden_size": hidden_size,
        "intermediate_size": raw["intermediate_size"],
        "num_hidden_layers": raw["num_hidden_layers"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": raw.get("num_key_value_heads") or num_heads,
        "head_dim": head_dim,
        "rms_norm_eps": raw.get("rms_norm_eps", 1e-6),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings,
        "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False)),
        "attention_bias": attention_bias,
        "qk_norm": architecture == "Qwen3ForCausalLM",
        "torch_dtype": torch_dtype,
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": raw.get("eos_token_id"),
    }
