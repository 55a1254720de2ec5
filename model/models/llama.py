"""The Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a flat batch of tokens.

Weights keep Hugging Face names except two fusions made at load time (see weights.py):
`self_attn.qkv_proj` = q_proj|k_proj|v_proj rows, `mlp.gate_up_proj` = gate_proj|up_proj rows.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers.attention.backends import get_attention_backend
from model.layers.attention.metadata import AttentionMetadata
from model.layers.attention.torch_backend import TorchAttentionBackend, lone_decode_attention
from model.layers.fused_ops import silu_and_mul
from model.layers.linear import (
    BATCH_ROWS_NEVER,
    Linear,
    batch_linear,
    best_time,
    faster_batch_dtype,
    linear,
    pack_weight,
)
from model.layers.norm import RMSNorm
from model.layers.quant import (
    QuantizedWeight,
    quantization_supported,
    quantize_with_reference,
    rescore_top_logits,
)
from model.layers.rotary import apply_rope, rope_cos_sin_cache, rope_factors

# Rows from which a quantized layer's packed copy may run (Linear.batch_rows): the ladder
# calibrate_batch_rows() times.
BATCH_ROWS_LADDER = (2, 4, 8, 16, 32, 64)

if TYPE_CHECKING:
    from model.layers.parallel import TPContext

# A layer's attention over its context: (q [T, heads, hd], k, v [T, kv_heads, hd], scale) -> the
# output [T, heads, hd]; it also stores k and v in the KV cache.
Attend = Callable[..., torch.Tensor]


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: TorchAttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=config.o_proj_bias)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn_backend = attn_backend
        self.tp: TPContext | None = None  # set by shard_model() (model/layers/parallel.py)

    def forward(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = linear(hidden, self.qkv_proj)
        if self.qk_norm:
            q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
            q = apply_rope(self.q_norm(q.view(num_tokens, self.num_heads, self.head_dim)), cos, sin)
            k = apply_rope(
                self.k_norm(k.view(num_tokens, self.num_kv_heads, self.head_dim)), cos, sin
            )
        else:
            # q and k are adjacent in qkv: rotate both with one set of ops.
            qk = qkv[:, : self.q_size + self.kv_size]
            qk = apply_rope(
                qk.view(num_tokens, self.num_heads + self.num_kv_heads, self.head_dim), cos, sin
            )
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            v = qkv[:, self.q_size + self.kv_size :]
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attend(q, k, v, scale=self.scale)
        # Quantized: the kernel's bf16 result, which the residual add promotes (sharded: the
        # all-reduce sums in the model's dtype).
        out = linear(out.reshape(num_tokens, self.q_size), self.o_proj, any_dtype=self.tp is None)
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.tp: TPContext | None = None  # set by shard_model()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = linear(x, self.gate_up_proj)  # (T, 2 * intermediate)
        out = linear(silu_and_mul(gate_up), self.down_proj, any_dtype=self.tp is None)  # as o_proj
        return out if self.tp is None else self.tp.all_reduce(out)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: TorchAttentionBackend) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, attn_backend)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attend: Attend,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual add is deferred into the next norm (one fused pass on CUDA):
        returns (this layer's MLP output, the residual stream before adding it)."""
        if residual is None:
            residual, hidden = hidden, self.input_layernorm.forward(hidden)
        else:
            hidden, residual = self.input_layernorm.add_and_norm(hidden, residual)
        hidden = self.self_attn.forward(hidden, cos, sin, attend)
        hidden, residual = self.post_attention_layernorm.add_and_norm(hidden, residual)
        return self.mlp.forward(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, attn_backend: TorchAttentionBackend) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, attn_backend) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Decoder-only transformer over a flat batch; serves Llama, Mistral, Qwen2, Qwen3."""

    def __init__(
        self, config: ModelConfig, attn_backend: TorchAttentionBackend | str = "torch"
    ) -> None:
        super().__init__()
        if isinstance(attn_backend, str):
            attn_backend = get_attention_backend(attn_backend)
        self.config = config
        self.attn_backend = attn_backend
        self.model = LlamaModel(config, attn_backend)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        # (P, hd) cos|sin table; rebuilt by init_rope_cache() after materialising the module.
        self.register_buffer("cos_sin_cache", torch.empty(0), persistent=False)
        self.lm_head_packed: torch.Tensor | None = None  # set by pack_for_cpu()
        self.lm_head_quantized: QuantizedWeight | None = None  # set by quantize_for_cpu()
        self.lm_head_batch_rows = BATCH_ROWS_NEVER  # see Linear.batch_rows
        self.tp: TPContext | None = None  # set by shard_model(): this rank's vocabulary slice

    def init_rope_cache(self) -> None:
        """(Re)compute the RoPE table on the module's device, in the module's dtype."""
        weight = self.model.embed_tokens.weight
        table = rope_cos_sin_cache(self.config).to(device=weight.device, dtype=weight.dtype)
        self.cos_sin_cache = table

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_cache: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """input_ids, positions: [T] -> hidden states [T, hidden_size] (after the final norm).

        kv_cache: [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim] or None (then
        every sequence in `meta` must be a whole prompt, nothing cached).
        """
        # One unbind for the layers' (K, V) views instead of four indexing ops per layer.
        layer_kv = (
            [(None, None)] * len(self.model.layers)
            if kv_cache is None
            else [kv.unbind(0) for kv in kv_cache.unbind(0)]
        )
        backend = self.attn_backend.forward
        attends = [partial(backend, k_cache=k, v_cache=v, meta=meta) for k, v in layer_kv]
        return self._decoder(input_ids, positions, attends)

    def forward_lone_decode(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_slots: torch.Tensor,
        slot: torch.Tensor,
        ctx_slots: torch.Tensor,
    ) -> torch.Tensor:
        """forward() of one decoding sequence, with tensors only (what
        model/engine/cpu_decode.py compiles).

        kv_slots: the KV pool as `[num_layers * 2 * num_slots, num_kv_heads, head_dim]` (layer
        i's K slots, then its V slots); slot: `[1]`, where the new token goes within a layer's
        slots; ctx_slots: `[context length]`, its context's slots, the new token's included.
        """
        num_slots = kv_slots.shape[0] // (2 * len(self.model.layers))
        attends = [
            partial(
                lone_decode_attention,
                kv_slots=kv_slots,
                k_base=2 * i * num_slots,
                v_base=(2 * i + 1) * num_slots,
                slot=slot,
                ctx_slots=ctx_slots,
            )
            for i in range(len(self.model.layers))
        ]
        return self._decoder(input_ids, positions, attends)

    def _decoder(
        self, input_ids: torch.Tensor, positions: torch.Tensor, attends: list[Attend]
    ) -> torch.Tensor:
        """Embedding, the layers (layer i attending with attends[i]) and the final norm."""
        assert self.cos_sin_cache.numel(), "call init_rope_cache() (load_model does) first"
        embed = self.model.embed_tokens.weight
        # (T, H); sharded: a masked lookup of this rank's vocabulary rows + an all-reduce.
        hidden = (
            F.embedding(input_ids, embed) if self.tp is None else self.tp.embed(input_ids, embed)
        )
        cos, sin = rope_factors(self.cos_sin_cache.index_select(0, positions))  # (T, 1, hd) each
        residual = None
        # The layers and their parts are called through forward(): no module-call overhead.
        for layer, attend in zip(self.model.layers, attends, strict=True):
            hidden, residual = layer.forward(hidden, residual, cos, sin, attend)
        return self.model.norm.add_and_norm(hidden, residual)[0]

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, hidden_size] (rows that sample) -> logits [N, vocab] float32.

        Sharded: every rank must call it with the same rows; rank 0 gets [N, vocab], the
        others their own vocabulary slice."""
        quantized = self.lm_head_quantized
        if quantized is not None and (
            self.lm_head_packed is None or hidden.shape[0] < self.lm_head_batch_rows
        ):
            logits = rescore_top_logits(quantized(hidden).float(), hidden, self._lm_head_rows)
        elif self.lm_head_packed is not None:
            packed = self.lm_head_packed
            logits = batch_linear(hidden, packed).float()
            if quantized is not None and packed.dtype != hidden.dtype:  # bf16 copy: as above
                logits = rescore_top_logits(logits, hidden, self._lm_head_rows)
        else:
            logits = F.linear(hidden, self.lm_head_weight).float()
        return logits if self.tp is None else self.tp.gather_logits(logits)

    def _lm_head_rows(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The fp32 LM head rows `ids` that rescore_top_logits recomputes the top logits with:
        a tied head's embedding rows (the weights as loaded), else its quantized weight's."""
        if self.lm_head is None:
            return self.model.embed_tokens.weight.index_select(0, ids).float()
        return self.lm_head_quantized.exact_rows(ids)

    def pack_for_cpu(self) -> bool:
        """Run the linear layers and the LM head from oneDNN-packed weights (model/cpu_linear.py).

        Each packed layer releases its plain weight (tied embeddings stay for the lookup), one
        layer at a time so the weights are never held twice. Returns whether every layer was
        packed; a layer that cannot be (device, dtype, torch build) keeps F.linear. Layers
        quantized by quantize_for_cpu() (called first) stay quantized.
        """
        if self.lm_head_packed is None and self.lm_head_quantized is None:
            self.lm_head_packed = pack_weight(self.lm_head_weight)
            if self.lm_head_packed is None:
                return False
            if self.lm_head is not None:
                self.lm_head.packed_weight, self.lm_head.weight = self.lm_head_packed, None
        all_packed = True
        for layer in self.model.layers.modules():
            if isinstance(layer, Linear) and layer.weight is not None:
                layer.packed_weight = pack_weight(layer.weight, layer.bias)
                if layer.packed_weight is None:
                    all_packed = False
                else:
                    layer.weight = None  # in_features/out_features keep the shape
        return all_packed

    def quantize_for_cpu(self, mode: str, batch_weights: bool = False) -> bool:
        """Run the linear layers and the LM head from weight-only `mode` ("int8" or "int4")
        weights (model/layers/quant.py); the embeddings stay as they are.

        batch_weights: each quantized layer also keeps a oneDNN-packed copy of its dequantized
        weight, which batches of `batch_rows` rows or more run from where that measured faster
        on this machine (calibrate_batch_rows(); copies that never win are released). The copies
        are bf16 where oneDNN ran the largest projection faster in bf16 than in fp32
        (faster_batch_dtype: AVX512-BF16 or AMX machines; batches then compute in bf16, as the
        quantized kernels do, and the LM head's top candidates are rescored in fp32), else fp32.

        Call it before pack_for_cpu(), which then packs only what was not quantized. Each
        quantized layer releases its plain weight (tied embeddings stay for the lookup), one layer
        at a time. Returns whether every layer was quantized; a layer that cannot be (shape,
        dtype, torch build) keeps its weight.
        """
        assert self.lm_head_packed is None, "quantize_for_cpu() needs the plain weights"
        all_quantized = True
        batch_dtype = self._batch_weight_dtype(mode) if batch_weights else None
        if self.lm_head_quantized is None:
            # Each row's top candidates are rescored in fp32 (quant.py): an untied head keeps its
            # codes for that, a tied one reads its embedding rows (_lm_head_rows).
            packed = quantize_with_reference(
                self.lm_head_weight, mode, keep_codes=self.lm_head is not None
            )
            if packed is None:
                all_quantized = False
            else:
                self.lm_head_quantized, reference = packed
                if batch_dtype is not None:
                    self.lm_head_packed = pack_weight(reference.to(batch_dtype))
                if self.lm_head is not None:
                    self.lm_head.quantized, self.lm_head.weight = self.lm_head_quantized, None
        for layer in self.model.layers.modules():
            if isinstance(layer, Linear) and layer.weight is not None:
                packed = quantize_with_reference(layer.weight, mode, layer.bias)
                if packed is None:
                    all_quantized = False
                else:
                    layer.quantized, reference = packed
                    if batch_dtype == torch.float32:
                        layer.packed_weight = pack_weight(reference, layer.bias)
                    elif batch_dtype is not None:  # the bias is added after, in fp32
                        layer.packed_weight = pack_weight(reference.to(batch_dtype))
                    layer.weight = None  # in_features/out_features keep the shape
        if batch_weights:
            self.calibrate_batch_rows()
        return all_quantized

    def _batch_weight_dtype(self, mode: str) -> torch.dtype:
        """faster_batch_dtype() of the largest quantizable projection (fp32 when none is)."""
        weights = [
            m.weight
            for m in self.model.layers.modules()
            if isinstance(m, Linear)
            and m.weight is not None
            and quantization_supported(m.weight, mode)
        ]
        if not weights:
            return torch.float32
        largest = max(weights, key=lambda w: w.numel())
        with torch.inference_mode():
            return faster_batch_dtype(largest.float())

    @torch.inference_mode()
    def calibrate_batch_rows(self, ladder: tuple[int, ...] = BATCH_ROWS_LADDER) -> dict:
        """For each shape of quantized layer that also holds a packed copy (and the LM head),
        the fewest rows from which the copy ran at least as fast as the quantized kernel: timed
        over every layer of that shape in turn, so the weights come from memory as in a step.
        Copies that never win are released. Returns {(out, in) or "lm_head": rows or None}."""
        kinds: dict[tuple[int, int], list[Linear]] = {}
        for layer in self.model.layers.modules():
            if isinstance(layer, Linear) and layer.has_batch_weight:
                kinds.setdefault((layer.out_features, layer.in_features), []).append(layer)
        chosen: dict = {}
        for shape, layers in kinds.items():
            rows = _crossover_rows(
                [layer.quantized for layer in layers],
                [layer.packed_weight for layer in layers],
                shape[1],
                ladder,
            )
            chosen[shape] = rows
            for layer in layers:
                if rows is None:
                    layer.packed_weight = None
                else:
                    layer.batch_rows = rows
        if self.lm_head_quantized is not None and self.lm_head_packed is not None:
            qw = self.lm_head_quantized
            rows = _crossover_rows([qw], [self.lm_head_packed], qw.in_features, ladder)
            chosen["lm_head"] = rows
            if rows is None:
                self.lm_head_packed = None
            else:
                self.lm_head_batch_rows = rows
        return chosen


def _crossover_rows(
    quantized: list[QuantizedWeight], packed: list[torch.Tensor], num_in: int, ladder
) -> int | None:
    """The first row count of `ladder` at which a pass over `packed` took no longer than one over
    `quantized` (best of two passes each), or None."""

    def best_pass(fn, weights, x) -> float:
        return best_time(lambda: [fn(x, w) for w in weights], 2)

    for rows in ladder:
        x = torch.randn(rows, num_in)
        # Warm-up: oneDNN builds its kernel for a new row count on the first call.
        best_pass(lambda x, w: w(x), quantized[:1], x)
        best_pass(batch_linear, packed[:1], x)
        t_quantized = best_pass(lambda x, w: w(x), quantized, x)
        t_packed = best_pass(batch_linear, packed, x)
        if t_packed <= t_quantized:
            return rows
    return None
