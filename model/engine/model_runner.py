"""Scheduled sequences -> flat batch tensors -> forward -> sampler (and prompt scoring).

The only place that makes tensors from `Sequence` objects: `run` reads the scheduler's output
as it is (each sequence, its chunk size, whether it samples) and the sampling row each
sequence carries; attention metadata is built here and handed to the model as an argument.
For a sequence that needs prompt logprobs, the logits of every prompt position in its chunk
score the prompt token after it (log-softmax of the raw logits), a few hundred rows at a time
so a long chunk never holds [T, vocab] at once.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Protocol

import torch

from model.config import ModelConfig
from model.engine.config import EngineConfig
from model.engine.outputs import PromptLogprob
from model.engine.scheduler import ScheduledSeq
from model.engine.sequence import Sequence
from model.layers.attention.metadata import build_attention_metadata
from model.layers.linear import Linear
from model.layers.parallel import TPContext, shard_model
from model.models.loader import load_model
from model.sample.metadata import SamplerOutput, SamplingMetadata, SamplingRow
from model.sample.sampler import Sampler

logger = logging.getLogger("nanoserve.runner")

# Prompt positions scored per LM-head call: bounds the [rows, vocab] logits held at once.
SCORE_ROWS_PER_CALL = 256


@dataclass
class RunnerOutput:
    """One step's results: the sampler's (None when no sequence samples) and, per sequence
    that needs prompt logprobs, the entries of the prompt tokens this step scored (in order)."""

    sampled: SamplerOutput | None
    prompt_logprobs: list[tuple[Sequence, list[PromptLogprob]]] = field(default_factory=list)


class StepBroadcaster(Protocol):
    """Rank 0's side of a tensor-parallel group (TPDriver, model/engine/distributed.py): what
    the runner sends the workers so they run each forward alongside it."""

    tp: TPContext
    backend: str

    def send_step(
        self,
        num_blocks: int,
        input_ids: list[int],
        positions: list[int],
        seq_lens: list[int],
        query_lens: list[int],
        block_tables: list[list[int]],
        score_rows: list[int],
        sample_rows: list[int],
    ) -> None: ...

    def send_profile(self) -> None: ...

    def fail(self, message: str) -> None: ...


def dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fits_batch_weights(model: torch.nn.Module) -> bool:
    """Whether the linear layers' fp32 weights (the packed copies quantized layers keep for
    batches, LlamaForCausalLM.quantize_for_cpu) take at most an eighth of the machine's memory."""
    fp32_bytes = 4 * sum(
        m.in_features * m.out_features for m in model.modules() if isinstance(m, Linear)
    )
    if model.lm_head is None:
        fp32_bytes += 4 * model.lm_head_weight.numel()
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return False
    return fp32_bytes <= total // 8


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        tp: TPContext | None = None,
        driver: StepBroadcaster | None = None,
    ) -> None:
        """tp: this rank's place in a tensor-parallel group (model/engine/distributed.py), whose
        rank 0 also has the `driver` that sends each step to the other ranks."""
        self.config = config
        self.device = torch.device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.tp = tp
        self.driver = driver
        self.model, self.model_config = load_model(
            config.model_dir,
            device=config.device,
            dtype=config.torch_dtype,
            attn_backend=config.attn_backend,
        )
        if tp is not None:  # before packing or quantizing: they work on this rank's slices
            shard_model(self.model, tp)
        # This rank's KV heads (all of them without tensor parallelism).
        self.num_kv_heads = self.model_config.num_key_value_heads // config.tensor_parallel_size
        # CPU: the linear layers from weight-only quantized weights (model/layers/quant.py) when
        # asked, the rest from oneDNN-packed ones (model/layers/linear.py) when they can.
        self.quantized_weights = ""  # the summary's words for them once every layer is quantized
        self.packed_weights = False
        if self.device.type == "cpu" and config.quantization != "none":
            from model.layers.quant import quantization_label

            batch_weights = config.cpu_packed_weights and _fits_batch_weights(self.model)
            if self.model.quantize_for_cpu(config.quantization, batch_weights):
                self.quantized_weights = quantization_label(config.quantization)
                batch = [
                    m for m in self.model.modules() if isinstance(m, Linear) and m.has_batch_weight
                ]
                if batch:
                    dtype = str(batch[0].packed_weight.dtype).removeprefix("torch.")
                    rows = min(m.batch_rows for m in batch)
                    self.quantized_weights += f", {dtype} oneDNN from {rows} rows"
            else:
                logger.warning(
                    "%s kernels unavailable for some linear layers; they run unquantized",
                    config.quantization,
                )
        if self.device.type == "cpu" and config.cpu_packed_weights and not self.quantized_weights:
            self.packed_weights = self.model.pack_for_cpu()
            if not self.packed_weights:
                logger.info("oneDNN-packed weights unavailable for %s; F.linear", config.dtype)
        self.sampler = Sampler()
        self.kv_cache: torch.Tensor | None = None
        self.num_blocks = 0
        self.graph_runner = None  # DecodeGraphRunner once captured (CUDA only)
        self.lone_decode = None  # CompiledLoneDecode once compiled (CPU only)

    @property
    def block_bytes(self) -> int:
        """Bytes of K and V for one block across all layers."""
        mc: ModelConfig = self.model_config
        per_token = 2 * mc.num_hidden_layers * self.num_kv_heads * mc.head_dim
        return per_token * self.config.block_size * dtype_size(self.config.torch_dtype)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        assert num_blocks > 0
        self.num_blocks = num_blocks
        # (layers, K/V, blocks, block_size, kv_heads, head_dim)
        self.kv_cache = torch.zeros(
            mc.num_hidden_layers,
            2,
            num_blocks,
            self.config.block_size,
            self.num_kv_heads,
            mc.head_dim,
            dtype=self.config.torch_dtype,
            device=self.device,
        )

    def capture_decode_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """CUDA graphs of the decode step for a ladder of batch sizes (bound to this pool)."""
        from model.engine.cuda_graphs import DecodeGraphRunner

        if not getattr(self.model.attn_backend, "supports_cuda_graphs", False):
            logger.info(
                "attention backend %s cannot be captured; decode runs eagerly",
                self.config.attn_backend,
            )
            return
        assert self.kv_cache is not None
        self.graph_runner = DecodeGraphRunner(
            self.model,
            self.kv_cache,
            max_batch_size=max_num_seqs,
            max_blocks_per_seq=-(-max_model_len // self.config.block_size),
            block_size=self.config.block_size,
        )
        self.graph_runner.capture()

    def compile_lone_decode(self) -> None:
        """The compiled decode step of one sequence (CPU), bound to this pool."""
        from model.engine.cpu_decode import CompiledLoneDecode

        assert self.kv_cache is not None
        compiled = CompiledLoneDecode(self.model, self.kv_cache, self.config.block_size)
        if compiled.compile():
            self.lone_decode = compiled

    def num_blocks_for_gpu(self, gpu_memory_utilization: float, max_num_batched_tokens: int) -> int:
        """Blocks that fit in the GPU memory left after weights and a warm-up at the largest batch."""
        assert self.device.type == "cuda"
        if self.driver is not None:
            self.driver.send_profile()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        self.warm_up(max_num_batched_tokens)
        free, total = torch.cuda.mem_get_info()
        peak = torch.cuda.max_memory_allocated()
        used_by_others = total - free - torch.cuda.memory_reserved()
        budget = total * gpu_memory_utilization - used_by_others - peak
        num_blocks = max(int(budget // self.block_bytes), 0)
        return num_blocks if self.tp is None else self.tp.min_over_ranks(num_blocks)

    @torch.inference_mode()
    def warm_up(self, num_tokens: int) -> None:
        """One forward of `num_tokens` prompt tokens without a KV pool of real size."""
        saved = self.kv_cache
        num_blocks = (num_tokens + self.config.block_size - 1) // self.config.block_size
        self.allocate_kv_cache(num_blocks)
        ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
        pos = torch.arange(num_tokens, device=self.device)
        meta = build_attention_metadata(
            [num_tokens],
            [num_tokens],
            [list(range(num_blocks))],
            self.config.block_size,
            self.device,
        )
        hidden = self.model(ids, pos, self.kv_cache, meta)
        self.model.compute_logits(hidden[-1:])
        self.kv_cache = saved
        if saved is None:
            self.num_blocks = 0

    @torch.inference_mode()
    def run(self, scheduled: list[ScheduledSeq]) -> RunnerOutput:
        """One forward over every scheduled token: each seq's `num_new_tokens` from its
        `num_computed_tokens` on. Samples the seqs with `is_sampling` from their
        `sampling_row` (the sampler's lists follow their order) and scores the prompt
        tokens of the seqs that need prompt logprobs."""
        assert self.kv_cache is not None, "allocate_kv_cache first"
        input_ids: list[int] = []
        positions: list[int] = []
        seq_lens: list[int] = []
        query_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_indices: list[int] = []
        rows: list[SamplingRow] = []
        # Flat rows whose logits score the prompt token after them, those tokens, and per
        # scoring seq how many rows are its.
        score_rows: list[int] = []
        score_targets: list[int] = []
        score_spans: list[tuple[Sequence, int]] = []
        num_tokens = 0
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            end = start + n
            if seq.needs_prompt_logprobs:
                num_scored = len(seq.prompt_logprobs)
                assert start < num_scored, f"{seq}: prompt positions skipped unscored"
                # Position p scores token p + 1; a recompute (preemption) skips what is scored.
                first, stop = num_scored - 1, min(end, seq.num_prompt_tokens - 1)
                if first < stop:
                    offset = num_tokens - start
                    score_rows.extend(range(offset + first, offset + stop))
                    score_targets.extend(seq.token_ids[first + 1 : stop + 1])
                    score_spans.append((seq, stop - first))
            if n == 1:
                input_ids.append(seq.token_ids[start])
                positions.append(start)
            else:
                input_ids.extend(seq.token_ids[start:end])
                positions.extend(range(start, end))
            seq_lens.append(end)
            query_lens.append(n)
            block_tables.append(seq.block_table)
            num_tokens += n
            if item.is_sampling:
                sample_indices.append(num_tokens - 1)
                rows.append(seq.sampling_row)
        device = self.device
        if self.driver is not None:
            self.driver.send_step(
                self.num_blocks,
                input_ids,
                positions,
                seq_lens,
                query_lens,
                block_tables,
                score_rows,
                sample_indices,
            )
        meta = build_attention_metadata(
            seq_lens, query_lens, block_tables, self.config.block_size, device
        )
        ids_t = torch.tensor(input_ids, dtype=torch.long, device=device)
        pos_t = torch.tensor(positions, dtype=torch.long, device=device)
        graphs, lone_decode = self.graph_runner, self.lone_decode
        if graphs is not None and graphs.can_run(meta):
            hidden = graphs.run(ids_t, pos_t, meta)  # a view of the graph's static output
        elif lone_decode is not None and lone_decode.can_run(meta):
            hidden = lone_decode.run(ids_t, pos_t, meta)
        else:
            hidden = self.model(ids_t, pos_t, self.kv_cache, meta)
        output = RunnerOutput(None)
        if score_rows:
            output.prompt_logprobs = self._score_prompts(
                hidden, score_rows, score_targets, score_spans
            )
        if not rows:
            return output
        if len(sample_indices) != num_tokens:
            hidden = hidden[torch.tensor(sample_indices, dtype=torch.long, device=device)]
        logits = self.model.compute_logits(hidden)
        sampling_meta = SamplingMetadata.build(rows, logits.shape[-1], device)
        output.sampled = self.sampler(logits, sampling_meta)
        return output

    def _score_prompts(
        self,
        hidden: torch.Tensor,
        rows: list[int],
        targets: list[int],
        spans: list[tuple[Sequence, int]],
    ) -> list[tuple[Sequence, list[PromptLogprob]]]:
        """Log-softmax of the raw logits at `rows`: each target token's logprob and rank, and
        the top-k of each span's seq (k = its SamplingParams.prompt_logprobs)."""
        device = hidden.device
        max_k = max(seq.sampling_params.prompt_logprobs for seq, _ in spans)
        rows_t = torch.tensor(rows, dtype=torch.long, device=device)
        targets_t = torch.tensor(targets, dtype=torch.long, device=device).unsqueeze(1)  # (R, 1)
        chosen_parts, rank_parts, top_value_parts, top_id_parts = [], [], [], []
        for lo in range(0, len(rows), SCORE_ROWS_PER_CALL):
            part = slice(lo, lo + SCORE_ROWS_PER_CALL)
            logits = self.model.compute_logits(hidden[rows_t[part]])  # (r, V) float32
            logprobs = torch.log_softmax(logits, dim=-1)
            chosen = logprobs.gather(1, targets_t[part])  # (r, 1)
            chosen_parts.append(chosen.squeeze(1))
            rank_parts.append((logprobs > chosen).sum(dim=-1) + 1)
            if max_k:
                values, ids = torch.topk(logprobs, max_k, dim=-1)  # (r, k), sorted
                top_value_parts.append(values)
                top_id_parts.append(ids)
        chosen_list = torch.cat(chosen_parts).tolist()
        rank_list = torch.cat(rank_parts).tolist()
        top_values = torch.cat(top_value_parts).tolist() if max_k else [[]] * len(rows)
        top_ids = torch.cat(top_id_parts).tolist() if max_k else [[]] * len(rows)
        out: list[tuple[Sequence, list[PromptLogprob]]] = []
        j = 0
        for seq, count in spans:
            k = seq.sampling_params.prompt_logprobs
            entries = [
                PromptLogprob(
                    targets[i],
                    chosen_list[i],
                    rank_list[i],
                    list(zip(top_ids[i][:k], top_values[i][:k], strict=True)),
                )
                for i in range(j, j + count)
            ]
            out.append((seq, entries))
            j += count
        return out
