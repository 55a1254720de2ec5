"""Building a model for a checkpoint folder: dtype resolution, meta-device construction, weights."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from model.layers.attention.torch_backend import TorchAttentionBackend
from model.models.llama import LlamaForCausalLM


def resolve_dtype(dtype: torch.dtype | str, device: torch.device) -> torch.dtype:
    """torch dtype from a dtype or a name; "auto" = fp32 on CPU, bf16 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
        "float16": torch.float16,
        "fp16": torch.float16,
        "half": torch.float16,
    }
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r} (use auto, float32, bfloat16 or float16)")
    return names[dtype]


def load_model(
    model_dir: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    attn_backend: TorchAttentionBackend | str = "torch",
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Build the model for `model_dir` and load its safetensors; raises ModelLoadError.

    The module is created on the meta device and materialised once on `device`, so each weight
    is written exactly once. Returns the model in eval mode.
    """
    from model.models.weights import load_weights

    config = ModelConfig.from_dir(model_dir)
    device = torch.device(device)
    dtype = resolve_dtype(dtype, device)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, attn_backend)
    model = model.to(dtype=dtype).to_empty(device=device)
    load_weights(model, model_dir)
    model.init_rope_cache()
    model.eval()
    model.requires_grad_(False)
    return model, config
