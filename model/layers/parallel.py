"""Tensor parallelism for LlamaForCausalLM: each rank of N keeps its slice of every weight.

`shard_model(model, tp)` is applied once, after loading and before any CPU packing or
quantization, and leaves rank r of N with:

- q/k/v (`qkv_proj`) and gate/up (`gate_up_proj`): column-parallel, its heads (q by attention
  heads, k and v by KV heads) and its rows of the intermediate size; no communication.
- o_proj and down_proj: row-parallel, its columns; one all-reduce (sum) after each. Only rank 0
  keeps a bias, so the sum adds it once.
- the embedding: its vocabulary rows; a token outside them looks up zeros (masked lookup), and
  one all-reduce assembles the hidden states.
- the LM head (tied or not): its vocabulary rows; rank 0 gathers the logits of all ranks.

The forward consults `tp` only where a model has been sharded (`model.tp is not None`): the
one-rank model runs exactly the ops it ran before. Every rank's KV cache holds its own
`num_key_value_heads // N` heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.layers.linear import Linear


@dataclass
class TPContext:
    """One rank's place in the tensor-parallel group the forward communicates over."""

    rank: int
    world_size: int
    group: dist.ProcessGroup | None = None  # None: the default group
    backend: str = "gloo"
    device: torch.device = torch.device("cpu")  # where this rank's tensors live

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of `x` over the ranks, in place."""
        dist.all_reduce(x, group=self.group)
        return x

    def min_over_ranks(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.long, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())

    def embed(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Embedding lookup from this rank's vocabulary rows `weight` [V / N, H]: [T] -> [T, H]."""
        rows = weight.shape[0]
        local = input_ids - self.rank * rows
        is_local = (local >= 0) & (local < rows)  # (T,)
        hidden = F.embedding(local.clamp(0, rows - 1), weight)  # (T, H)
        hidden.masked_fill_(~is_local.unsqueeze(1), 0.0)
        return self.all_reduce(hidden)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, V / world] on every rank -> [N, V] on rank 0 (the others get their own slice)."""
        logits = logits.contiguous()
        if self.rank != 0:
            dist.gather(logits, None, dst=0, group=self.group)
            return logits
        parts = [torch.empty_like(logits) for _ in range(self.world_size)]
        dist.gather(logits, parts, dst=0, group=self.group)
        return torch.cat(parts, dim=-1)


def valid_tp_sizes(config: ModelConfig) -> list[int]:
    """Every size the model can be sharded over: divisors of the KV heads that also divide the
    attention heads, the intermediate size and the vocabulary."""
    common = math.gcd(
        config.num_key_value_heads,
        config.num_attention_heads,
        config.intermediate_size,
        config.vocab_size,
    )
    return [n for n in range(1, common + 1) if common % n == 0]


def check_tp_size(config: ModelConfig, size: int) -> None:
    """Raises ValueError naming the sizes that would work when `size` cannot shard `config`."""
    sizes = valid_tp_sizes(config)
    if size not in sizes:
        raise ValueError(
            f"tensor_parallel_size {size} does not divide the model's "
            f"{config.num_key_value_heads} KV heads, {config.num_attention_heads} attention "
            f"heads, intermediate size {config.intermediate_size} and vocabulary "
            f"{config.vocab_size}; sizes that work: {', '.join(map(str, sizes))}"
        )


def _keep_rows(layer: Linear, parts: list[tuple[int, int]]) -> None:
    """Keep rows [start, start + count) of each (start, count) of `layer`'s weight and bias."""
    index = torch.cat([torch.arange(s, s + n) for s, n in parts]).to(layer.weight.device)
    layer.weight = nn.Parameter(layer.weight.index_select(0, index), requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.index_select(0, index), requires_grad=False)
    layer.out_features = index.numel()


def _keep_columns(layer: Linear, start: int, count: int, keep_bias: bool) -> None:
    columns = layer.weight[:, start : start + count].contiguous()
    layer.weight = nn.Parameter(columns, requires_grad=False)
    if not keep_bias:
        layer.bias = None
    layer.in_features = count


def shard_model(model: nn.Module, tp: TPContext) -> None:
    """Cut a loaded LlamaForCausalLM (plain weights) down to rank `tp.rank`'s slice, in place,
    and make its forward communicate over `tp`. Raises ValueError for a size that does not fit."""
    config: ModelConfig = model.config
    check_tp_size(config, tp.world_size)
    n, r = tp.world_size, tp.rank
    hd = config.head_dim
    heads, kv_heads = config.num_attention_heads // n, config.num_key_value_heads // n
    inter = config.intermediate_size // n
    q_size, kv_size = config.num_attention_heads * hd, config.num_key_value_heads * hd
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        # qkv rows: q | k | v; this rank's heads of each.
        _keep_rows(
            attn.qkv_proj,
            [
                (r * heads * hd, heads * hd),
                (q_size + r * kv_heads * hd, kv_heads * hd),
                (q_size + kv_size + r * kv_heads * hd, kv_heads * hd),
            ],
        )
        attn.num_heads, attn.num_kv_heads = heads, kv_heads
        attn.q_size, attn.kv_size = heads * hd, kv_heads * hd
        _keep_columns(attn.o_proj, r * heads * hd, heads * hd, keep_bias=r == 0)
        attn.tp = tp
        # gate_up rows: gate | up; this rank's share of each.
        inter_full = config.intermediate_size
        _keep_rows(mlp.gate_up_proj, [(r * inter, inter), (inter_full + r * inter, inter)])
        mlp.intermediate_size = inter
        _keep_columns(mlp.down_proj, r * inter, inter, keep_bias=r == 0)
        mlp.tp = tp
    vocab = config.vocab_size // n
    embed = model.model.embed_tokens
    embed.weight = nn.Parameter(embed.weight[r * vocab : (r + 1) * vocab].clone(), False)
    embed.num_embeddings = vocab
    if model.lm_head is not None:
        _keep_rows(model.lm_head, [(r * vocab, vocab)])
    model.tp = tp
