"""oneDNN-packed linear layers (model/cpu_linear.py) against F.linear, and pack_for_cpu()."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.layers.linear import Linear, pack_weight, packed_linear, packing_supported

if not packing_supported(torch.empty(2, 2)):
    pytest.skip("oneDNN is not in this torch build", allow_module_level=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("num_rows", [1, 3, 17, 64, 200])
def test_packed_linear_matches_f_linear(dtype, bias, num_rows):
    if dtype != torch.float32 and pack_weight(torch.randn(8, 8).to(dtype)) is None:
        pytest.skip(f"this CPU has no oneDNN {dtype} matmul (pack_weight falls back to F.linear)")
    gen = torch.Generator().manual_seed(num_rows)
    weight = (torch.randn(96, 80, generator=gen) * 0.1).to(dtype)
    b = torch.randn(96, generator=gen).to(dtype) if bias else None
    packed = pack_weight(weight, b)
    assert packed is not None
    x = torch.randn(num_rows, 80, generator=gen).to(dtype)
    out = packed_linear(x, packed, b)
    assert out.shape == (num_rows, 96) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), F.linear(x, weight, b).float(), atol=tolerance, rtol=0)


def test_packed_linear_takes_a_strided_input():
    weight = torch.randn(32, 16)
    packed = pack_weight(weight)
    wide = torch.randn(5, 48)
    x = wide[:, 8:24]  # rows not contiguous
    torch.testing.assert_close(packed_linear(x, packed), F.linear(x, weight), atol=1e-5, rtol=0)


def test_unsupported_weights_are_not_packed():
    assert pack_weight(torch.randn(4, 4, dtype=torch.float64)) is None
    assert pack_weight(torch.randn(4)) is None


def test_linear_layer_runs_from_its_packed_weight():
    layer = Linear(16, 8, bias=True)
    x = torch.randn(4, 16)
    with torch.no_grad():
        expected = layer(x)
        layer.packed_weight = pack_weight(layer.weight, layer.bias)
        layer.weight = None  # what pack_for_cpu does: the plain weight is not read again
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
