"""CUDA graphs for decode steps: one graph per batch size of a ladder, replayed on static buffers.

A decode step of a small model is dominated by kernel launches (a few hundred per forward);
replaying a captured graph issues them all at once. Each graph is captured for a fixed batch
size over static input buffers (input_ids, positions, slot_mapping, block_tables, seq_lens); a
step copies its inputs into the buffers, pads the batch up to the next captured size and replays.

What the attention backend must satisfy to be captured (`supports_cuda_graphs = True`; the
triton backend does, the torch one does not: its decode plan is built from python lengths):
- no host synchronisation and no host-to-device copy from python data inside forward (no
  `.item()`, `.tolist()`, `torch.tensor(list)`, data-dependent shapes);
- nothing that depends on python ints of the step other than the batch size: the sequence
  lengths change between replays while the graph keeps its launch grids, so the decode kernel's
  grid must not depend on `max_seq_len` (the triton decode splits each context into a count of
  splits chosen from the batch size only and skips empty splits on the device);
- every tensor it reads comes from the metadata tensors or the KV pool it is given (the graph
  records their addresses: the pool must not be reallocated after `capture()`);
- padding rows: slot -1 must write nothing; seq_len 1 over block_tables row 0 must be readable.

The returned hidden states are a view of the graph's static output: use them (compute logits)
before the next `run()`.
"""

from __future__ import annotations

import logging

import torch

from model.layers.attention.metadata import AttentionMetadata

logger = logging.getLogger("nanoserve.cuda_graphs")


def decode_batch_sizes(max_batch_size: int, step: int = 16) -> list[int]:
    """The capture ladder: powers of two up to `step`, then multiples of `step`, then the max."""
    assert max_batch_size >= 1 and step >= 1
    sizes = []
    size = 1
    while size < min(step, max_batch_size):
        sizes.append(size)
        size *= 2
    size = step
    while size < max_batch_size:
        sizes.append(size)
        size += step
    sizes.append(max_batch_size)
    return sizes


class DecodeGraphRunner:
    """Captures `model(input_ids, positions, kv_cache, meta)` for decode-only batches.

    On a CUDA device `capture()` records one graph per ladder size (largest first, all in one
    memory pool); elsewhere, or with `use_graphs=False`, `run()` calls the model eagerly on the
    same padded static buffers, which lets the padding logic be tested without a GPU.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: torch.Tensor,
        max_batch_size: int,
        max_blocks_per_seq: int,
        block_size: int,
        batch_sizes: list[int] | None = None,
        use_graphs: bool | None = None,
    ) -> None:
        backend = getattr(model, "attn_backend", None)
        assert getattr(backend, "supports_cuda_graphs", False), (
            "the attention backend cannot be captured in a CUDA graph"
        )
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.block_size = block_size
        self.max_blocks_per_seq = max_blocks_per_seq
        self.batch_sizes = sorted(batch_sizes or decode_batch_sizes(max_batch_size))
        self.max_batch_size = self.batch_sizes[-1]
        if use_graphs is None:
            use_graphs = self.device.type == "cuda" and torch.cuda.is_available()
        self.use_graphs = use_graphs

        max_bs, device = self.max_batch_size, self.device
        self.input_ids = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.long, device=device)
        # Zeros: padding rows read block 0, which exists in every pool.
        self.block_tables = torch.zeros(
            max_bs, max_blocks_per_seq, dtype=torch.int32, device=device
        )
        self.seq_lens = torch.ones(max_bs, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self._metas: dict[int, AttentionMetadata] = {}
        self._pool = None

    def padded_batch_size(self, num_seqs: int) -> int:
        """The smallest captured size that holds `num_seqs` sequences."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        raise ValueError(f"batch of {num_seqs} exceeds the largest captured {self.max_batch_size}")

    def can_run(self, meta: AttentionMetadata) -> bool:
        """True for a decode-only step that fits the buffers."""
        return (
            meta.max_query_len == 1
            and meta.seq_lens.shape[0] <= self.max_batch_size
            and meta.block_tables.shape[1] <= self.max_blocks_per_seq
            and meta.block_size == self.block_size
        )

    def _static_meta(self, batch_size: int) -> AttentionMetadata:
        max_seq_len = self.max_blocks_per_seq * self.block_size
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch_size],
            block_tables=self.block_tables[:batch_size],
            seq_lens=self.seq_lens[:batch_size],
            query_start_loc=self.query_start_loc[: batch_size + 1],
            max_query_len=1,
            # Python lengths are frozen into a graph: a capturable backend must not use them.
            max_seq_len=max_seq_len,
            seq_lens_list=[max_seq_len] * batch_size,
            query_lens_list=[1] * batch_size,
            block_size=self.block_size,
        )

    def _forward(self, batch_size: int) -> torch.Tensor:
        return self.model(
            self.input_ids[:batch_size],
            self.positions[:batch_size],
            self.kv_cache,
            self._metas[batch_size],
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every ladder size (no-op but for the static metadata when not using graphs).

        Run it after the KV pool has its final size; the padding rows write nowhere, so the
        capture leaves the pool untouched.
        """
        for size in self.batch_sizes:
            self._metas[size] = self._static_meta(size)
        if not self.use_graphs:
            return
        self._pool = torch.cuda.graph_pool_handle()
        # Largest first: the smaller graphs reuse the memory the largest one reserved.
        for size in reversed(self.batch_sizes):
            self._forward(size)  # compile kernels and pick cuBLAS algorithms outside the capture
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured decode CUDA graphs for batch sizes %s", self.batch_sizes)

    @torch.inference_mode()
    def run(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """One decode step: input_ids, positions [B] -> hidden states [B, hidden_size].

        Requires `can_run(meta)` and a prior `capture()`. The result is a view of a static
        buffer, valid until the next run.
        """
        assert self.can_run(meta) and self._metas, "not a capturable decode step, or not captured"
        num_seqs = input_ids.shape[0]
        size = self.padded_batch_size(num_seqs)
        num_blocks = meta.block_tables.shape[1]
        self.input_ids[:num_seqs].copy_(input_ids, non_blocking=True)
        self.positions[:num_seqs].copy_(positions, non_blocking=True)
        self.slot_mapping[:num_seqs].copy_(meta.slot_mapping, non_blocking=True)
        self.seq_lens[:num_seqs].copy_(meta.seq_lens, non_blocking=True)
        # Columns past num_blocks keep older block ids: never read, as seq_lens bound the reads.
        self.block_tables[:num_seqs, :num_blocks].copy_(meta.block_tables, non_blocking=True)
        if size > num_seqs:  # padding rows: attend to one slot of block 0, store nothing
            self.slot_mapping[num_seqs:size].fill_(-1)
            self.seq_lens[num_seqs:size].fill_(1)
            self.block_tables[num_seqs:size, 0].fill_(0)
        if self.use_graphs:
            self.graphs[size].replay()
            return self.outputs[size][:num_seqs]
        return self._forward(size)[:num_seqs]
