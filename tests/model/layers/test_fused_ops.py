"""Fused RMSNorm(+residual) and SiLU*mul: Triton kernels against the torch fallbacks and llama.py.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)
HAS_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAS_CUDA else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16] if HAS_CUDA else [torch.float32]


@pytest.fixture(scope="module")
def ops():
    """model.triton_ops with interpreted kernels on the CPU (chosen when a kernel is decorated)."""
    if HAS_CUDA:
        return importlib.import_module("model.layers.fused_ops")
    os.environ.setdefault("TRITON_INTERPRET", "1")
    module = importlib.import_module("model.layers.fused_ops")
    if type(module._rms_norm_kernel).__name__ != "InterpretedFunction":
        module = importlib.reload(module)
    return module


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96])  # a power of two and not
def test_rms_norm_matches_llama(ops, dtype, hidden):
    from model.layers.norm import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(hidden, 1e-6).to(DEVICE, dtype)
    norm.weight.data = torch.randn(hidden, device=DEVICE, dtype=dtype)
    x = torch.randn(2, 5, hidden, device=DEVICE, dtype=dtype) * 3
    ref = norm(x)
    out = ops.rms_norm(x, norm.weight, 1e-6, use_triton=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert (out.float() - ref.float()).abs().max().item() < tolerance(dtype)
    assert torch.equal(ops.rms_norm(x, norm.weight, 1e-6, use_triton=False), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(ops, dtype):
    torch.manual_seed(1)
    hidden = 80
    x = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    residual = torch.randn(7, hidden, device=DEVICE, dtype=dtype)
    weight = torch.randn(hidden, device=DEVICE, dtype=dtype)
    ref_out, ref_res = ops.fused_add_rms_norm(x, residual, weight, 1e-5, use_triton=False)
    out, res = ops.fused_add_rms_norm(x, residual, weight, 1e-5, use_triton=True)
    assert torch.equal(res, x + residual)  # the residual sum rounds exactly as torch's add
    assert torch.equal(ref_res, x + residual)
    assert (out.float() - ref_out.float()).abs().max().item() < tolerance(dtype)


def test_rms_norm_strided_rows(ops):
    """Rows of a wider tensor (a view with a row stride larger than the hidden size)."""
    torch.manual_seed(2)
    wide = torch.randn(4, 48, device=DEVICE)
    x = wide[:, :32]
    weight = torch.rand(32, device=DEVICE)
    ref = ops.rms_norm(x, weight, 1e-6, use_triton=False)
    assert (ops.rms_norm(x, weight, 1e-6, use_triton=True) - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [64, 1500])  # one tile and several (tile is 1024), ragged
def test_silu_and_mul(ops, dtype, width):
    torch.manual_seed(3)
    gate_up = torch.randn(3, 2 * width, device=DEVICE, dtype=dtype) * 4
    gate, up = gate_up.chunk(2, dim=-1)
    ref = F.silu(gate) * up
    out = ops.silu_and_mul(gate_up, use_triton=True)
    assert out.shape == ref.shape and out.dtype == dtype
    assert (out.float() - ref.float()).abs().max().item() < tolerance(dtype) * 4
    assert torch.equal(ops.silu_and_mul(gate_up, use_triton=False), ref)


def test_empty_batches(ops):
    x = torch.empty(0, 16, device=DEVICE)
    weight = torch.ones(16, device=DEVICE)
    assert ops.rms_norm(x, weight, 1e-6, use_triton=True).shape == (0, 16)
    assert ops.fused_add_rms_norm(x, x, weight, 1e-6, use_triton=True)[1].shape == (0, 16)
    assert ops.silu_and_mul(torch.empty(0, 32, device=DEVICE), use_triton=True).shape == (0, 16)


def test_auto_picks_torch_on_cpu(ops):
    x = torch.randn(2, 8)
    assert ops._pick(x, None) is False
