"""Attention metadata of one flat batch: slots, block tables, lengths; built once per step by the
runner and handed to every layer as an explicit argument (the pool layout: torch_backend.py)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    """Where the new tokens of one flat batch go and what context each sequence attends to.

    The new tokens of sequence b are the last `query_lens_list[b]` positions of its context of
    `seq_lens_list[b]` tokens. Python copies of the lengths let backends plan without a device sync.
    """

    slot_mapping: torch.Tensor  # [T] int64
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    seq_lens: torch.Tensor  # [B] int32, context length after this step
    query_start_loc: torch.Tensor  # [B+1] int32, cumulative new-token counts
    max_query_len: int
    max_seq_len: int
    seq_lens_list: list[int]
    query_lens_list: list[int]
    block_size: int
    # Backend-private plan, built on the first layer and reused by the others.
    _plan: Any = field(default=None, init=False, repr=False, compare=False)


def build_attention_metadata(
    seq_lens: list[int],
    query_lens: list[int],
    block_tables: list[list[int]],
    block_size: int,
    device: torch.device | str,
) -> AttentionMetadata:
    """Build the metadata of one step from python lists (one entry per sequence, batch order).

    Every block table must cover its sequence's context (`len >= ceil(seq_len / block_size)`).
    """
    num_seqs = len(seq_lens)
    assert num_seqs == len(query_lens) == len(block_tables) and num_seqs > 0
    assert block_size > 0
    seq_lens_np = np.asarray(seq_lens, dtype=np.int64)
    query_lens_np = np.asarray(query_lens, dtype=np.int64)
    assert (query_lens_np >= 1).all() and (query_lens_np <= seq_lens_np).all()

    table_lens = np.fromiter(map(len, block_tables), dtype=np.int64, count=num_seqs)
    assert (table_lens * block_size >= seq_lens_np).all(), "block table shorter than its sequence"
    max_blocks = int(table_lens.max())
    tables = np.zeros((num_seqs, max_blocks), dtype=np.int64)
    # Row-major boolean assignment fills each row's prefix in order.
    tables[np.arange(max_blocks) < table_lens[:, None]] = np.fromiter(
        itertools.chain.from_iterable(block_tables), dtype=np.int64, count=int(table_lens.sum())
    )

    query_start_loc = np.zeros(num_seqs + 1, dtype=np.int64)
    np.cumsum(query_lens_np, out=query_start_loc[1:])
    num_tokens = int(query_start_loc[-1])
    if num_tokens == num_seqs:  # decode-only: one new token per sequence, at position seq_len - 1
        seq_index = np.arange(num_seqs)
        positions = seq_lens_np - 1
    else:
        seq_index = np.repeat(np.arange(num_seqs), query_lens_np)
        positions = (
            np.arange(num_tokens)
            - np.repeat(query_start_loc[:-1], query_lens_np)
            + np.repeat(seq_lens_np - query_lens_np, query_lens_np)
        )
    slot_mapping = tables[seq_index, positions // block_size] * block_size + positions % block_size

    return AttentionMetadata(
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        block_tables=torch.from_numpy(tables.astype(np.int32)).to(device),
        seq_lens=torch.from_numpy(seq_lens_np.astype(np.int32)).to(device),
        query_start_loc=torch.from_numpy(query_start_loc.astype(np.int32)).to(device),
        max_query_len=int(query_lens_np.max()),
        max_seq_len=int(seq_lens_np.max()),
        seq_lens_list=[int(n) for n in seq_lens],
        query_lens_list=[int(n) for n in query_lens],
        block_size=block_size,
    )
