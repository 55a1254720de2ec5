"""The engine's configuration (`EngineConfig`) and the dtype names it accepts.

Torch-free at import: the CLI reads these fields' defaults for its flags (`nanoserve serve
--help` loads no torch); torch is imported when a config is built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

MiB = 1 << 20
GiB = 1 << 30
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8", "int4")


@dataclass
class EngineConfig:
    model_dir: str
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_num_seqs: int = 256
    max_num_batched_tokens: int | None = None  # None: 512 on CPU, 2048 on CUDA
    block_size: int = 16
    kv_cache_memory_bytes: int = 2 * GiB  # CPU pool size
    gpu_memory_utilization: float = 0.9  # CUDA: share of GPU memory the process may use
    enable_prefix_caching: bool = True
    max_queued_requests: int = 1024
    attn_backend: str = "auto"  # auto (triton on CUDA when importable, else torch) | torch | triton
    enforce_eager: bool = False  # no CUDA graphs for decode steps; CPU: no compiled decode step
    num_threads: int | None = None
    cpu_packed_weights: bool = True  # CPU: linear layers from oneDNN-packed weights
    quantization: str = "none"  # CPU: none | int8 (per channel) | int4 (group 32) weight-only
    tensor_parallel_size: int = 1  # ranks the model is sharded over (N - 1 worker processes)
    distributed_init_method: str | None = None  # torch.distributed rendezvous; None: a free tcp://

    def __post_init__(self) -> None:
        import torch

        if self.device == "auto":
            self.device = "cuda" if torch.cuda.is_available() else "cpu"
        is_cuda = self.device.startswith("cuda")
        if self.dtype == "auto":
            self.dtype = "bfloat16" if is_cuda else "float32"
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {self.dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {self.quantization!r}"
            )
        if is_cuda and self.quantization != "none":
            raise ValueError(
                f"quantization {self.quantization!r} runs on the CPU only; "
                "use --quantization none with CUDA"
            )
        if self.attn_backend == "auto":
            from model.layers.attention.triton_backend import triton_available

            self.attn_backend = "triton" if is_cuda and triton_available() else "torch"
        if self.max_num_batched_tokens is None:
            self.max_num_batched_tokens = 2048 if is_cuda else 512
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_queued_requests"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError("gpu_memory_utilization must be in (0, 1]")
        if self.kv_cache_memory_bytes <= 0:
            raise ValueError("kv_cache_memory_bytes must be > 0")
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if is_cuda and self.tensor_parallel_size > 1:
            last = self.rank_device(self.tensor_parallel_size - 1)
            if torch.device(last).index >= torch.cuda.device_count():
                raise ValueError(
                    f"tensor_parallel_size {self.tensor_parallel_size} from {self.device} needs "
                    f"GPUs up to {last}; {torch.cuda.device_count()} are visible"
                )

    def rank_device(self, rank: int) -> str:
        """The device of tensor-parallel rank `rank`: the GPU `rank` after this config's on CUDA."""
        if not self.device.startswith("cuda"):
            return self.device
        return f"cuda:{int(self.device.partition(':')[2] or 0) + rank}"

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)
