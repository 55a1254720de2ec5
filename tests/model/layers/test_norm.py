"""RMSNorm on the CPU: F.rms_norm for small batches, plain ops from RMS_NORM_PLAIN_ROWS rows
(model/layers/fused_ops.py), both the Llama formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers.fused_ops import RMS_NORM_PLAIN_ROWS
from model.layers.norm import RMSNorm


@pytest.mark.parametrize("rows", [1, RMS_NORM_PLAIN_ROWS - 1, RMS_NORM_PLAIN_ROWS, 700])
def test_rms_norm_is_the_llama_formula_at_every_batch_size(rows):
    torch.manual_seed(rows)
    hidden, eps = 96, 1e-5
    norm = RMSNorm(hidden, eps)
    norm.weight.data = torch.randn(hidden)
    x = torch.randn(rows, hidden) * 3
    x64 = x.double()
    want = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps) * norm.weight.double()
    got = norm(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, F.rms_norm(x, (hidden,), norm.weight, eps))
    residual = torch.randn(rows, hidden)
    normed, summed = norm.add_and_norm(x, residual)
    assert torch.equal(summed, x + residual)
    torch.testing.assert_close(normed, F.rms_norm(x + residual, (hidden,), norm.weight, eps))
