"""Fused elementwise steps of the decoder: RMSNorm (+ residual add) and SiLU(gate) * up.

Each op has a Triton kernel (one pass over memory instead of several torch kernels) and a torch
fallback with the same rounding as model/llama.py: in half precision the residual sum is rounded
to the model dtype, normalised in fp32, rounded, then scaled by the weight in the model dtype.
`use_triton=None` picks the kernel for CUDA tensors when triton is installed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model.layers.triton_compat import HAS_TRITON, tl, triton


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Weight,
    Out,
    Residual_out,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    eps,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    dtype = x.dtype
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        x = x.to(dtype)  # the residual stream is kept in the model dtype
        tl.store(Residual_out + row * stride_ro + offs, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, 0) / N + eps)
    weight = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
    if IS_FP32:
        y = x * inv_rms * weight
    else:
        y = (x * inv_rms).to(dtype).to(tl.float32) * weight
    tl.store(Out + row * stride_o + offs, y.to(dtype), mask=mask)


@triton.jit
def _silu_and_mul_kernel(
    X,
    Out,
    stride_x,
    stride_o,
    N: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(X + row * stride_x + N + offs, mask=mask, other=0.0)
    dtype = gate.dtype
    gate = gate.to(tl.float32)
    silu = (gate * tl.sigmoid(gate)).to(dtype)  # rounded as torch's F.silu output is
    out = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(Out + row * stride_o + offs, out.to(dtype), mask=mask)


def _pick(x: torch.Tensor, use_triton: bool | None) -> bool:
    if use_triton is None:
        return HAS_TRITON and x.is_cuda
    assert not use_triton or HAS_TRITON, "triton is not installed"
    return use_triton


# Rows from which the fp32 norm runs as plain ops: F.rms_norm's CPU composite took 2-7x longer
# from about 300 rows (at 512: 370-925 us against 130; from 1 to 256 rows ~5% faster).
RMS_NORM_PLAIN_ROWS = 256


def _rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32 and x.numel() < RMS_NORM_PLAIN_ROWS * x.shape[-1]:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()  # x itself in fp32
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def _launch_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    hidden = x.shape[-1]
    x2 = x.reshape(-1, hidden)  # (rows, hidden)
    assert x2.stride(-1) == 1 and weight.is_contiguous()
    out = torch.empty_like(x2)
    res2 = res_out = None
    if residual is not None:
        res2 = residual.reshape(-1, hidden)
        assert res2.stride(-1) == 1 and res2.dtype == x.dtype
        res_out = torch.empty_like(x2)
    num_rows = x2.shape[0]
    if num_rows:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(num_rows,)](
            x2,
            res2 if res2 is not None else x2,
            weight,
            out,
            res_out if res_out is not None else out,
            x2.stride(0),
            res2.stride(0) if res2 is not None else 0,
            out.stride(0),
            res_out.stride(0) if res_out is not None else 0,
            eps,
            N=hidden,
            BLOCK=block,
            HAS_RESIDUAL=residual is not None,
            IS_FP32=x.dtype == torch.float32,
            num_warps=max(1, min(16, block // 256)),
        )
    out = out.view(x.shape)
    return out, (res_out.view(x.shape) if res_out is not None else None)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, use_triton: bool | None = None
) -> torch.Tensor:
    """RMSNorm over the last axis: x [..., H], weight [H] -> [..., H]."""
    if not _pick(x, use_triton):
        return _rms_norm_torch(x, weight, eps)
    return _launch_rms_norm(x, None, weight, eps)[0]


def fused_add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    use_triton: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`residual = x + residual`, then RMSNorm of it: returns (normed, residual), both [..., H]."""
    if not _pick(x, use_triton):
        residual = x + residual
        return _rms_norm_torch(residual, weight, eps), residual
    normed, residual = _launch_rms_norm(x, residual, weight, eps)
    return normed, residual


def silu_and_mul(gate_up: torch.Tensor, use_triton: bool | None = None) -> torch.Tensor:
    """gate_up [..., 2*I] (gate | up) -> SiLU(gate) * up [..., I]."""
    if not _pick(gate_up, use_triton):
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
    width = gate_up.shape[-1] // 2
    x2 = gate_up.reshape(-1, 2 * width)  # (rows, 2I)
    assert x2.stride(-1) == 1
    out = torch.empty((x2.shape[0], width), dtype=gate_up.dtype, device=gate_up.device)
    if x2.shape[0]:
        block = min(1024, triton.next_power_of_2(width))
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(width, block))](
            x2, out, x2.stride(0), out.stride(0), N=width, BLOCK=block, num_warps=4
        )
    return out.view(*gate_up.shape[:-1], width)
