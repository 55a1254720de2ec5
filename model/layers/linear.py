"""Linear layers on the CPU from weights pre-packed for oneDNN.

`F.linear` on the CPU hands the weight to BLAS in its stored `[out, in]` layout on every call.
oneDNN can instead reorder the weight once, at load time, into the blocked layout its matmul
kernels stream from (what torch.compile's CPU backend does with frozen weights). On the default
model on 2 cores that made whole decode steps 1.5-1.8x faster at batch 1 to 64 in fp32 and
1.1-1.6x in bf16: BLAS on the stored layout read the weights at a quarter of the machine's
bandwidth at batch 1, and at batch 64 ran the large projections (LM head, gate/up) at under
half oneDNN's rate.

The ops are torch's own (`torch.ops.mkldnn`). They are used on x86-64 only, where they were
measured; `pack_weight` checks them against `F.linear` once and returns None where they are
missing or disagree, and the caller keeps the plain weight.
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.layers.quant import QuantizedWeight

logger = logging.getLogger("nanoserve.cpu_linear")

# Linear.batch_rows of a layer whose batches never run from its packed copy.
BATCH_ROWS_NEVER = 1 << 62

# The batch size oneDNN tunes the packed layout for; the result is correct for any batch.
# Measured on decode steps: 64 beat 1 at batch 1 as well (41 vs 51 ms/step), 16 and 256 were close.
PACK_BATCH_HINT = 64

_DTYPES = (torch.float32, torch.bfloat16)
_MACHINES = ("x86_64", "amd64")


def packing_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype in _DTYPES
        and weight.dim() == 2
        and platform.machine().lower() in _MACHINES
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a 2-D x, from `pack_weight(weight)`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def batch_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None, any_dtype: bool = False
) -> torch.Tensor:
    """`packed_linear` for a packed weight of any dtype: x is cast to it and the result back to
    x's dtype (any_dtype without a bias: left in the weight's), the bias added after, in x's."""
    if packed.dtype == x.dtype:
        return packed_linear(x, packed, bias)
    out = packed_linear(x.to(packed.dtype), packed)
    if any_dtype and bias is None:
        return out
    out = out.to(x.dtype)
    return out if bias is None else out.add_(bias)


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of `repeats` timed calls of fn, in seconds."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def faster_batch_dtype(weight: torch.Tensor, rows: tuple[int, ...] = (16, 64)) -> torch.dtype:
    """bf16 where a oneDNN-packed bf16 copy of `weight` ran faster than an fp32 one at every row
    count of `rows` (machines with AVX512-BF16 or AMX: 2.5-4.5x on the default model's
    projections at 16 to 512 rows), else fp32. Best of three timed calls each, after a warm-up."""
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    copies = {dtype: pack_weight(weight.to(dtype)) for dtype in _DTYPES}
    if any(packed is None for packed in copies.values()):
        return torch.float32
    for num_rows in rows:
        x = torch.randn(num_rows, weight.shape[1], generator=torch.Generator().manual_seed(0))
        best = {}
        for dtype, packed in copies.items():
            batch_linear(x, packed)  # warm-up
            best[dtype] = best_time(lambda x=x, packed=packed: batch_linear(x, packed), 3)
        if best[torch.bfloat16] >= best[torch.float32]:
            return torch.float32
    return torch.bfloat16


def pack_weight(weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """oneDNN's packed copy of a `[out, in]` linear weight, or None where it cannot be used.

    The copy is checked against `F.linear` on a small batch before it is returned.
    """
    if not packing_supported(weight):
        return None
    try:
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.to(weight.dtype)
        got = packed_linear(x, packed, bias).float()
        want = F.linear(x, weight, bias).float()
    except (RuntimeError, NotImplementedError) as exc:
        logger.info("oneDNN linear unavailable (%s); using F.linear", exc)
        return None
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    scale = max(want.abs().max().item(), 1.0)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=tolerance * scale):
        logger.warning("oneDNN linear disagrees with F.linear; using F.linear")
        return None
    return packed


class Linear(nn.Linear):
    """nn.Linear that can run from a oneDNN-packed weight (LlamaForCausalLM.pack_for_cpu) or a
    weight-only quantized one (quantize_for_cpu, model/layers/quant.py)."""

    packed_weight: torch.Tensor | None = None
    quantized: QuantizedWeight | None = None
    # With both: batches of this many rows or more run from packed_weight (the dequantized
    # weight, in fp32 or bf16: LlamaForCausalLM.quantize_for_cpu), fewer from the quantized
    # kernel (LlamaForCausalLM.calibrate_batch_rows).
    batch_rows: int = BATCH_ROWS_NEVER

    @property
    def has_batch_weight(self) -> bool:
        """Quantized, with a packed copy for batches."""
        return self.quantized is not None and self.packed_weight is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self)


def linear(x: torch.Tensor, layer: Linear, any_dtype: bool = False) -> torch.Tensor:
    """`layer(x)` without the cost of a module call. any_dtype: a quantized layer may return its
    kernel's dtype (bf16), saving a cast, for a caller that only adds the result to x's dtype."""
    quantized, packed = layer.quantized, layer.packed_weight
    if quantized is not None and (packed is None or x.shape[0] < layer.batch_rows):
        return quantized(x, layer.bias, any_dtype)
    if packed is not None:
        return batch_linear(x, packed, layer.bias, any_dtype)
    return F.linear(x, layer.weight, layer.bias)
