"""Weight-only quantized linear layers on the CPU: int8 per output channel, int4 in groups of 32.

A decode step at batch 1 reads every weight once, so its time follows the weight bytes: int8
reads a quarter of fp32's, int4 (two values a byte plus a scale and a zero point per 32) about a
seventh. The kernels are torch's own:

- int8, symmetric per output channel: `w = scale[n] * q` with q in [-127, 127]
  (`torch.ops.aten._weight_int8pack_mm`);
- int4, asymmetric in groups of 32 along the input dimension, with a float zero point:
  `w = scale * (q - 8) + zero` with q in [0, 15], the form GGUF's Q4_0/Q4_1/Q4_K blocks map onto
  (`_convert_weight_to_int4pack_for_cpu` / `_weight_int4pack_mm_for_cpu`; the scales and zero
  points travel as one `[K / 32, N, 2]` tensor).

Both run in bf16 whatever the model's dtype: torch 2.13's x86 kernels are vectorised for bf16
activations only and took 10-70x longer with fp32 ones (the default model's LM head at one row:
int4 48 ms with fp32 activations, 0.7 ms with bf16; oneDNN fp32 3 ms). So the scales and zero
points are stored in bf16, the activations are rounded to bf16 on the way in and the result is
cast back to the model's dtype on the way out; the kernels accumulate in fp32.

Rounding to bf16 moves a logit of 10 to 20 by up to 0.06, enough to reorder near-tied candidates:
`rescore_top_logits` recomputes each row's top candidates in fp32 from exact weight rows, for a
topk and an [8, hidden] product per row. An untied LM head packed with `keep_codes` keeps its
4-bit codes (two a byte) for them (`exact_rows`: with 8 candidates on the default model's int4
head, top-1 agreement with fp32 math on the same weights went 97.7% -> 99.3% over 2,208
positions); a tied one reads its embedding rows, the weights as loaded (a GGUF's own Q8_0 LM
head, say, rather than its 4-bit copy: on the default model 16 candidates gave 99.3% top-1
agreement with that head over 6,256 positions, where the 4-bit head alone gave 86.7%).

`quantize_weight` checks the packed weight against `F.linear` on the dequantized fp32 weight once
and returns None where a kernel is missing, cannot take the shape (int4: in_features a multiple
of 32 and out_features of 16; int8: in_features a multiple of 8, as torch 2.13's bf16 kernel
crashed on others; nothing is padded) or disagrees; the caller keeps the layer's unquantized
path then.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

logger = logging.getLogger("nanoserve.quant")

MODES = ("int8", "int4")
INT4_GROUP_SIZE = 32
INT4_N_MULTIPLE = 16  # the int4 packing's block of output rows
INT8_K_MULTIPLE = 8
INT8_MAX = 127
KERNEL_DTYPE = torch.bfloat16  # activations, scales and zero points inside the kernels

_DTYPES = (torch.float32, torch.bfloat16)
_OPS = {
    "int4": ("_convert_weight_to_int4pack_for_cpu", "_weight_int4pack_mm_for_cpu"),
    "int8": ("_weight_int8pack_mm",),
}
# The check at build time compares the kernel's bf16 output with fp32 math on the same bf16
# inputs: what is left is the output's rounding to bf16 (2^-9 relative) and summation order.
_TOLERANCE = 1e-2
# Candidates per row that rescore_top_logits recomputes in fp32 (8 missed a few top-1s).
RESCORE_TOP_K = 16


@dataclass(frozen=True)
class QuantizedWeight(ABC):
    """A packed `[out, in]` weight; `qw(x, bias)` is `F.linear(x, dequantized, bias)` for 2-D x,
    computed in bf16 and returned in x's dtype."""

    packed: torch.Tensor
    scales: torch.Tensor
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        """Bytes a matmul reads: the packed weight and its scales (and zero points)."""
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scales))

    def __call__(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, any_dtype: bool = False
    ) -> torch.Tensor:
        """any_dtype: return the kernel's bf16 result as it is (no bias), saving a cast."""
        out = self.matmul(x.to(KERNEL_DTYPE).contiguous())
        if any_dtype and bias is None:
            return out
        out = out.to(x.dtype)
        return out if bias is None else out.add_(bias)

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Contiguous bf16 `[M, in]` -> bf16 `[M, out]`."""

    @abstractmethod
    def exact_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The fp32 dequantized rows `ids` (`[n]` int64) -> `[n, in]`, or None when the codes
        were not kept."""


@dataclass(frozen=True)
class Int8Weight(QuantizedWeight):
    """packed: int8 `[N, K]`; scales: bf16 `[N]`."""

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)

    def exact_rows(self, ids: torch.Tensor) -> torch.Tensor:
        return dequantize_int8(self.packed.index_select(0, ids), self.scales.index_select(0, ids))


@dataclass(frozen=True)
class Int4Weight(QuantizedWeight):
    """packed: torch's CPU int4 layout (uint8 `[N, K / 2]`, blocked by 64 rows); scales: bf16
    `[K / 32, N, 2]` (scale, zero point); codes: None, or the codes row by row (uint8
    `[N, K / 2]`, input 2i in the low nibble of byte i, 2i + 1 in the high one)."""

    codes: torch.Tensor | None = None  # not read by matmul, so not in nbytes

    def exact_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        if self.codes is None:
            return None
        codes = self.codes.index_select(0, ids)  # (n, K/2)
        q = torch.stack([codes & 15, codes >> 4], dim=-1).view(len(ids), self.in_features)
        return dequantize_int4(q, self.scales.index_select(1, ids))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, self.packed, INT4_GROUP_SIZE, self.scales
        )


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` weight -> (q int8 `[N, K]`, bf16 scales `[N]`)."""
    w = weight.float()
    lo, hi = torch.aminmax(w, dim=1)
    scales = (torch.maximum(-lo, hi) / INT8_MAX).clamp(min=torch.finfo(KERNEL_DTYPE).tiny)
    scales = scales.to(KERNEL_DTYPE)  # q is rounded against the scales the kernel sees
    q = w.div(scales.float()[:, None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 `[N, K]` weight the int8 kernel computes with."""
    return q.float() * scales.float()[:, None]


def quantize_int4(
    weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[N, K]` weight -> (q int32 `[N, K]` in [0, 15], bf16 scales_and_zeros `[K / g, N, 2]`)
    with `w = scale * (q - 8) + zero` per group of `group_size` inputs (min-max per group)."""
    num_out, num_in = weight.shape
    assert num_in % group_size == 0, (num_in, group_size)
    groups = weight.float().reshape(num_out, num_in // group_size, group_size)  # (N, K/g, g)
    lo, hi = torch.aminmax(groups, dim=-1)
    scales = ((hi - lo) / 15).clamp(min=torch.finfo(KERNEL_DTYPE).tiny).to(KERNEL_DTYPE)
    zeros = (lo + 8 * scales.float()).to(KERNEL_DTYPE)
    # q against the scales and zero points the kernel sees (rounded to bf16).
    q = groups.sub(zeros.float()[..., None]).div_(scales.float()[..., None]).add_(8).round_()
    q = q.clamp_(0, 15).to(torch.int32).reshape(num_out, num_in)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).contiguous()
    return q, scales_and_zeros  # (N, K), (K/g, N, 2)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """The fp32 `[N, K]` weight the int4 kernel computes with."""
    num_out, num_in = q.shape
    num_groups = scales_and_zeros.shape[0]
    scales, zeros = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # (N, K/g) each
    groups = q.float().reshape(num_out, num_groups, num_in // num_groups)  # (N, K/g, g)
    return groups.sub_(8).mul_(scales[..., None]).add_(zeros[..., None]).reshape(num_out, num_in)


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown quantization {mode!r} (use {' or '.join(MODES)})")


def dequantized(weight: torch.Tensor, mode: str) -> torch.Tensor:
    """The fp32 weight that `quantize_weight(weight, mode)` computes with (the reference)."""
    _check_mode(mode)
    if mode == "int4":
        return dequantize_int4(*quantize_int4(weight))
    return dequantize_int8(*quantize_int8(weight))


def quantization_label(mode: str) -> str:
    """What the start-up summary says of a mode."""
    _check_mode(mode)
    if mode == "int4":
        return f"int4 weights (g{INT4_GROUP_SIZE})"
    return "int8 weights (per channel)"


def quantization_supported(weight: torch.Tensor, mode: str) -> bool:
    _check_mode(mode)
    if weight.device.type != "cpu" or weight.dtype not in _DTYPES or weight.dim() != 2:
        return False
    num_out, num_in = weight.shape
    if mode == "int4":
        shape_ok = num_in % INT4_GROUP_SIZE == 0 and num_out % INT4_N_MULTIPLE == 0
    else:
        shape_ok = num_in % INT8_K_MULTIPLE == 0
    return shape_ok and all(hasattr(torch.ops.aten, op) for op in _OPS[mode])


def _pack(
    weight: torch.Tensor, mode: str, keep_codes: bool
) -> tuple[QuantizedWeight, torch.Tensor]:
    """(the packed weight, the fp32 weight it computes with)."""
    num_out, num_in = weight.shape
    if mode == "int4":
        q, scales_and_zeros = quantize_int4(weight)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        codes = (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8) if keep_codes else None
        qw = Int4Weight(packed, scales_and_zeros, num_out, num_in, codes)
        return qw, dequantize_int4(q, scales_and_zeros)
    q, scales = quantize_int8(weight)
    return Int8Weight(q, scales, num_out, num_in), dequantize_int8(q, scales)


def quantize_weight(
    weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None, keep_codes: bool = False
) -> QuantizedWeight | None:
    """The `mode` ("int8" or "int4") packed copy of a `[out, in]` linear weight, or None where it
    cannot be used. keep_codes: int4 also keeps its codes for `exact_rows` (int8's packed weight
    is its codes).

    The copy is checked against `F.linear` on its dequantized fp32 weight on a small batch
    before it is returned.
    """
    packed = quantize_with_reference(weight, mode, bias, keep_codes)
    return None if packed is None else packed[0]


def quantize_with_reference(
    weight: torch.Tensor, mode: str, bias: torch.Tensor | None = None, keep_codes: bool = False
) -> tuple[QuantizedWeight, torch.Tensor] | None:
    """quantize_weight's packed copy and the fp32 weight it computes with (its dequantized
    weight), or None where it cannot be used."""
    if not quantization_supported(weight, mode):
        return None
    try:
        qw, reference = _pack(weight, mode, keep_codes)
        x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
        x = x.to(KERNEL_DTYPE)  # exact in the model's dtype too: only the kernel's rounding is left
        got = qw(x.to(weight.dtype), bias).float()
        want = F.linear(x.float(), reference, None if bias is None else bias.float())
    except (RuntimeError, NotImplementedError) as exc:
        logger.info(
            "%s weight-only linear unavailable (%s); keeping the weight as it is", mode, exc
        )
        return None
    scale = max(want.abs().max().item(), 1.0)
    if got.shape != want.shape or not torch.allclose(got, want, rtol=0, atol=_TOLERANCE * scale):
        logger.warning("%s weight-only linear disagrees with its reference; not quantized", mode)
        return None
    return qw, reference


TOP_CHUNK = 64  # top_indices' chunk width


def top_indices(logits: torch.Tensor, k: int) -> torch.Tensor:
    """`logits.topk(k, dim=-1).indices` of `[N, V]` logits, searched in the k chunks of TOP_CHUNK
    columns with the largest maxima when the rows are long: each of a row's k largest lies in one
    of them (a chunk outside them has k chunks above its maximum, so k values above each of its
    own). 3.5-4.5x faster than topk over a 49k vocabulary."""
    num_rows, num_cols = logits.shape
    if num_cols % TOP_CHUNK or num_cols < 4 * k * TOP_CHUNK:
        return logits.topk(k, dim=-1).indices
    chunk_max = logits.view(num_rows, -1, TOP_CHUNK).amax(-1)  # (N, V / chunk)
    chunks = chunk_max.topk(k, dim=-1).indices  # (N, k)
    offsets = torch.arange(TOP_CHUNK, device=logits.device)
    candidates = (chunks.unsqueeze(-1) * TOP_CHUNK + offsets).view(num_rows, -1)  # (N, k * chunk)
    best = logits.gather(1, candidates).topk(k, dim=-1).indices
    return candidates.gather(1, best)


def rescore_top_logits(
    logits: torch.Tensor,
    x: torch.Tensor,
    exact_rows: Callable[[torch.Tensor], torch.Tensor | None],
    k: int = RESCORE_TOP_K,
) -> torch.Tensor:
    """Approximate `logits` of x (`[N, out]` fp32) with each row's k largest recomputed in fp32
    from the weight rows `exact_rows(ids)` returns (a QuantizedWeight's dequantized ones, or a
    tied LM head's embedding rows), in place; unchanged where it returns None."""
    k = min(k, logits.shape[-1])
    if not logits.numel() or k == 0:
        return logits
    top = top_indices(logits, k)  # (N, k)
    rows = exact_rows(top.reshape(-1))
    if rows is None:
        return logits
    exact = torch.bmm(rows.view(*top.shape, -1), x.float().unsqueeze(-1)).squeeze(-1)
    return logits.scatter_(1, top, exact)
