"""Load Hugging Face safetensors checkpoints (single file or sharded) into LlamaForCausalLM.

Checkpoint names are the Hugging Face ones; q/k/v and gate/up projections are stacked into the
model's fused `qkv_proj` / `gate_up_proj` rows as they are read. Each tensor is read on its own
(safe_open) and copied once into the already allocated parameter, casting to its dtype.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from model.errors import ModelLoadError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_DISK_DTYPES = ("F32", "F16", "BF16")  # safetensors dtype codes
# Non-weight buffers some exporters include; recomputed by the model.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")
# checkpoint module name -> (fused module name, index of its shard)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


@dataclass
class _Target:
    """Where one checkpoint tensor lands: rows [row_start, row_start + shape[0]) of `param`."""

    param: torch.Tensor
    row_start: int
    shape: tuple[int, ...]


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a model folder (the index's shards, or model.safetensors)."""
    model_dir = Path(model_dir)
    index_path = model_dir / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (
            OSError,
            UnicodeDecodeError,
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
        ) as exc:
            raise ModelLoadError(f"{index_path}: not a valid safetensors index ({exc})") from None
        files = [model_dir / name for name in names]
        for path in files:
            if path.parent != model_dir or not path.is_file():
                raise ModelLoadError(f"{index_path}: shard {path.name} not found")
        return files
    single = model_dir / SINGLE_FILE
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE} found")


def _expected_tensors(model: nn.Module) -> dict[str, _Target]:
    """Checkpoint tensor name -> destination, for every parameter of the model."""
    config = model.config
    split_sizes = {
        "self_attn.qkv_proj": [
            config.num_attention_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
            config.num_key_value_heads * config.head_dim,
        ],
        "mlp.gate_up_proj": [config.intermediate_size, config.intermediate_size],
    }
    fused_to_parts: dict[str, list[str]] = {}
    for part, (fused, _) in _FUSED.items():
        fused_to_parts.setdefault(fused, []).append(part)

    expected = {}
    for name, param in model.named_parameters():
        fused = next((f for f in fused_to_parts if f".{f}." in name), None)
        if fused is None:
            expected[name] = _Target(param, 0, tuple(param.shape))
            continue
        prefix, kind = name.split(f".{fused}.")  # "model.layers.N", "weight" | "bias"
        row_start = 0
        for part, rows in zip(fused_to_parts[fused], split_sizes[fused], strict=True):
            expected[f"{prefix}.{part}.{kind}"] = _Target(
                param, row_start, (rows, *param.shape[1:])
            )
            row_start += rows
        assert row_start == param.shape[0], name
    return expected


def load_weights(model: nn.Module, model_dir: str | Path) -> None:
    """Fill every parameter of `model` (already on its device and dtype) from `model_dir`.

    Raises ModelLoadError naming the file and tensor on a missing, extra, mis-shaped or
    non-float tensor, or an unreadable file.
    """
    expected = _expected_tensors(model)
    tied = model.config.tie_word_embeddings
    loaded: set[str] = set()
    for path in checkpoint_files(model_dir):
        try:
            with safe_open(path, framework="pt", device="cpu") as reader:
                for name in reader.keys():  # noqa: SIM118 - safe_open is not a dict
                    if name.endswith(_IGNORED_SUFFIXES):
                        continue
                    if name == "lm_head.weight" and tied:
                        logger.debug("%s: ignoring lm_head.weight (tied embeddings)", path)
                        continue
                    target = expected.get(name)
                    if target is None:
                        raise ModelLoadError(f"{path}: unexpected tensor {name!r}")
                    if name in loaded:
                        raise ModelLoadError(f"{path}: tensor {name!r} appears twice")
                    _load_one(reader, path, name, target)
                    loaded.add(name)
        except SafetensorError as exc:
            raise ModelLoadError(f"{path}: cannot read safetensors ({exc})") from None
        except OSError as exc:
            raise ModelLoadError(f"{path}: cannot read ({exc})") from None
    missing = sorted(set(expected) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(f"{model_dir}: missing tensor {missing[0]!r}{more}")


def _load_one(reader, path: Path, name: str, target: _Target) -> None:
    tensor_slice = reader.get_slice(name)
    shape = tuple(tensor_slice.get_shape())
    if shape != target.shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {list(shape)}, expected {list(target.shape)}"
        )
    dtype = tensor_slice.get_dtype()
    if dtype not in _DISK_DTYPES:
        raise ModelLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
    tensor = reader.get_tensor(name)
    rows = shape[0]
    with torch.no_grad():
        target.param[target.row_start : target.row_start + rows].copy_(tensor)
