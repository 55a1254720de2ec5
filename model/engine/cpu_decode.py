"""The CPU decode step of one sequence, compiled once with torch.compile.

A batch-1 decode step of a small quantized model on the CPU is mostly the ~1,300 small ops
around its matmuls, each paying torch's dispatch: on the default model (int4, 2 cores) 7.8 ms of
its layers' 10 ms, of which the int4 matmuls take about 5. Compiled, the norms, RoPE, SiLU, casts
and KV writes of each layer become a few fused C++ loops, the matmuls and attention stay torch's
kernels, and one call runs all layers: 5.4 ms for the same layers, the same values bit for bit.

What is compiled is `LlamaForCausalLM.forward_lone_decode`, the model's own layers with the torch
backend's decode of one sequence whose context lies in consecutive slots of the pool (the usual
case of one user: a conversation continues in the block its last turn ended in). Other steps
(prefill chunks, batches, scattered contexts) run the model eagerly. Shapes are dynamic, so one
graph serves every context length; inductor keeps its output in a cache on disk
($TORCHINDUCTOR_CACHE_DIR, default $NANOSERVE_HOME/inductor), so a compile of ~45 s on first use
takes ~15 s afterwards. It runs once at load, before the server says it is ready; where it fails
(no C++ compiler, say) or disagrees with the eager step, the eager step stays.
"""

from __future__ import annotations

import logging
import os
import time

import torch

from model.layers.attention.metadata import AttentionMetadata, build_attention_metadata
from model.layers.attention.torch_backend import TorchAttentionBackend, lone_decode_first_slot

logger = logging.getLogger("nanoserve.cpu_decode")

# The warm-up's check against the eager step, relative to the largest value: the same ops, but the
# fused loops sum in another order, which can move an activation by one bf16 step on its way into
# a quantized kernel (seen: 1.1% of the largest hidden value after all layers; a wrong graph is off
# by its whole size).
_TOLERANCE = 5e-2
CHECK_LENGTHS = (3, 5)  # context lengths of the warm-up steps


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled code: $TORCHINDUCTOR_CACHE_DIR, else under NANOSERVE_HOME."""
    home = os.environ.get("NANOSERVE_HOME") or os.path.expanduser("~/.cache/nanoserve")
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or os.path.join(home, "inductor")


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
        return self.compiled is not None and lone_decode_first_slot(meta) is not None

    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        return self._call(self.compiled, input_ids, positions, meta)

    def _call(self, fn, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        first = lone_decode_first_slot(meta)
        assert first is not None
        ctx_len = meta.seq_lens_list[0]
        return fn(input_ids, positions, self.kv_slots, meta.slot_mapping, first, ctx_len)

    @torch.inference_mode()
    def compile(self) -> bool:
        """Compile, and check two steps of a made-up sequence in the pool's first blocks against
        the eager step (the pool is empty at load: nothing is lost). False, and the eager step
        stays, on failure."""
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache_dir())
        t0 = time.perf_counter()
        try:
            fn = torch.compile(self.model.forward_lone_decode, dynamic=True, fullgraph=True)
            # Lengths and slots other than 0 and 1, which would be specialised as constants.
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
        """The compiled and the eager step of a sequence of ctx_len tokens in blocks 2, 3, ...
        (random context, zeroed after) agree."""
        device = self.kv_cache.device
        blocks = list(range(2, 2 + -(-ctx_len // self.block_size)))
        used = self.kv_cache[:, :, : blocks[-1] + 1]
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
