"""The CPU decode step of one sequence, compiled once with torch.compile.

A batch-1 decode step of a small quantized model on the CPU is mostly the ~1,300 small ops
around its matmuls, each paying torch's dispatch: on the default model (int4, 2 cores) a step
took 11.0 ms, the int4 matmuls about 5 of them. Compiled, each layer's norms, RoPE, SiLU, casts
and KV writes become a few fused C++ loops, the matmuls and attention stay torch's kernels, and
one call from a C++ wrapper runs all 30 layers: 6.9 ms a step (bench/engine_bench.py
--quantization int4 --parts decode --decode-batches 1 --no-hf, with and without
--enforce-eager).

What is compiled is `LlamaForCausalLM.forward_lone_decode`: the model's own layers, with the
torch backend's decode of one sequence whose context is gathered from its slots. Every step that
decodes one sequence runs it; the others (prefill chunks, batches) run the model eagerly. Shapes
are dynamic, so one graph serves every context length. Inductor keeps what it compiled on disk
($TORCHINDUCTOR_CACHE_DIR; `nanoserve` sets it to $NANOSERVE_HOME/inductor): the compile at load
takes ~60 s the first time and ~15 s after (2-core Xeon). It runs before the server says it is
ready, and is checked against the eager step; where it fails (no C++ compiler, say) or
disagrees, the eager step stays.
"""

from __future__ import annotations

import logging
import time

import torch

from model.layers.attention.metadata import AttentionMetadata, build_attention_metadata
from model.layers.attention.torch_backend import (
    TorchAttentionBackend,
    is_lone_decode,
    lone_decode_context_slots,
)

logger = logging.getLogger("nanoserve.cpu_decode")

# The warm-up's check against the eager step, relative to the largest value: the same ops, but the
# fused loops sum in another order, which can move an activation by one bf16 step on its way into
# a quantized kernel (seen: 1.1% of the largest hidden value after all layers; a wrong graph is off
# by its whole size).
_TOLERANCE = 5e-2
# A C++ wrapper calls the graph's kernels: the Python one (with its size checks) took 1.2 ms of
# an 8.0 ms step (6.8 ms with this), at the cost of a longer first compile (~60 s against ~30).
INDUCTOR_OPTIONS = {"cpp_wrapper": True}
# bf16/fp16 models: round where eager rounds (inductor keeps fused chains in fp32 otherwise, and
# the bf16 default model then failed the check against the eager step).
HALF_OPTIONS = {"emulate_precision_casts": True}
CHECK_LENGTHS = (19, 37)  # context lengths of the warm-up steps (2 and 3 blocks of 16)


def inductor_options(dtype: torch.dtype) -> dict:
    return INDUCTOR_OPTIONS if dtype == torch.float32 else {**INDUCTOR_OPTIONS, **HALF_OPTIONS}


class CompiledLoneDecode:
    """`model(input_ids, positions, kv_cache, meta)` for the steps `can_run` accepts, from the
    compiled `forward_lone_decode`.

    Call `compile()` once (it warms up on the pool's first blocks and checks the result against
    the eager step); `run()` is only used after it returned True.
    """

    def __init__(self, model: torch.nn.Module, kv_cache: torch.Tensor, block_size: int) -> None:
        assert isinstance(model.attn_backend, TorchAttentionBackend), model.attn_backend
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.kv_slots = kv_cache.view(-1, *kv_cache.shape[-2:])  # (layers * 2 * slots, kv, hd)
        self.compiled = None
        self.compile_s = 0.0

    def can_run(self, meta: AttentionMetadata) -> bool:
        return self.compiled is not None and is_lone_decode(meta)

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self._call(self.compiled, input_ids, positions, meta)

    def _call(self, fn, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        ctx_slots = lone_decode_context_slots(meta)
        return fn(input_ids, positions, self.kv_slots, meta.slot_mapping, ctx_slots)

    @torch.inference_mode()
    def compile(self) -> bool:
        """Compile, checking two steps against the eager step on a made-up sequence in the pool's
        first blocks (the pool is empty at load: nothing is lost). False, and the eager step
        stays, on failure."""
        t0 = time.perf_counter()
        try:
            fn = torch.compile(
                self.model.forward_lone_decode,
                dynamic=True,
                fullgraph=True,
                options=inductor_options(self.kv_cache.dtype),
            )
            for ctx_len in CHECK_LENGTHS:
                if not self._check(fn, ctx_len):
                    logger.warning("compiled decode step disagrees with the eager one; not used")
                    return False
        except Exception as exc:  # noqa: BLE001 - any failure leaves the eager step in place
            logger.warning(
                "decode step not compiled (%s: %s); it runs eagerly", type(exc).__name__, exc
            )
            return False
        self.compiled = fn
        self.compile_s = time.perf_counter() - t0
        logger.info("decode step compiled in %.1f s", self.compile_s)
        return True

    def _check(self, fn, ctx_len: int) -> bool:
        """The compiled and the eager step agree on a sequence of ctx_len tokens in blocks 3, 1,
        5, 7, ... (a random context, zeroed after)."""
        device = self.kv_cache.device
        num_blocks = -(-ctx_len // self.block_size)
        blocks = [3, 1, *range(5, 5 + 2 * (num_blocks - 2), 2)][:num_blocks]
        used = self.kv_cache[:, :, : max(blocks) + 1]
        meta = build_attention_metadata([ctx_len], [1], [blocks], self.block_size, device)
        ids = torch.tensor([ctx_len % 7 + 1], device=device)
        pos = torch.tensor([ctx_len - 1], device=device)
        try:
            used.normal_(generator=torch.Generator(device=device).manual_seed(ctx_len))
            want = self.model(ids, pos, self.kv_cache, meta)
            got = self._call(fn, ids, pos, meta)
        finally:
            used.zero_()
        scale = max(want.abs().max().item(), 1.0)
        return bool(torch.allclose(got, want, rtol=0, atol=_TOLERANCE * scale))
