"""apply_rope (one roll and a fused multiply-add) against the textbook rotate-half form."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.layers.rotary import apply_rope, rope_cos_sin_cache, rope_factors


def textbook_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Hugging Face's form: x * cos + rotate_half(x) * sin, cos/sin [T, 1, hd/2] repeated."""
    cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def test_apply_rope_matches_the_textbook_form(default_model_dir):
    config = ModelConfig.from_dir(default_model_dir)
    table = rope_cos_sin_cache(config)  # (P, hd): cos | sin
    positions = torch.tensor([0, 1, 7, 300, config.max_position_embeddings - 1])
    rows = table.index_select(0, positions)
    x = torch.randn(len(positions), 5, config.head_dim, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_factors(rows)
    assert cos.shape == sin.shape == (len(positions), 1, config.head_dim)
    half = config.head_dim // 2
    want = textbook_rope(x, rows[:, None, :half], rows[:, None, half:])
    got = apply_rope(x, cos, sin)
    assert torch.allclose(got, want, rtol=0, atol=1e-6), (got - want).abs().max()
    assert torch.equal(apply_rope(x[:1], cos[:1], sin[:1]), x[:1])  # position 0 is no rotation
