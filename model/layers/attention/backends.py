"""The attention backend by name: "torch" (reference, CPU and CUDA) or "triton" (CUDA)."""

from __future__ import annotations

from model.layers.attention.torch_backend import TorchAttentionBackend

_BACKENDS = {"torch": TorchAttentionBackend}


def get_attention_backend(name: str):
    """Attention backend by name: "torch" (CPU and CUDA) or "triton" (CUDA, imported lazily)."""
    if name == "triton":
        from model.layers.attention.triton_backend import TritonAttentionBackend

        return TritonAttentionBackend()
    if name not in _BACKENDS:
        raise ValueError(
            f"unknown attention backend {name!r} (available: {', '.join(_BACKENDS)}, triton)"
        )
    return _BACKENDS[name]()
