"""Continuous batching: which sequences run this step, and how many tokens each (no torch).

Each step packs, under `max_num_batched_tokens`:
  1. the decode token of every running sequence (so a long prompt never stalls them),
  2. the next chunk of running sequences still prefilling, in admission order,
  3. waiting sequences, first come first served, each with its prefix-cache hit and
     a chunk of what is left, while the budget and `max_num_seqs` allow.
When blocks run out, the most recently admitted running sequence is preempted:
its blocks are freed (their cached contents stay reusable) and it goes back to the
front of the waiting queue, to recompute prompt + outputs when re-admitted.

Per step the engine calls `schedule()`, hands its output to the model runner, then
`update(...)` with the sampled tokens (in batch order), then `finish(seq, reason)` for
each sequence that stopped. A sequence without a completion budget (max_tokens 0: score
the prompt only) never samples: the step that computes its last prompt token marks it
`is_scored_only`, and the engine finishes it after that step.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from model.engine.block_manager import BlockManager
from model.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int = 16

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            # Otherwise the decodes of a full batch would not fit in one step.
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                f"max_num_seqs ({self.max_num_seqs})"
            )


@dataclass(slots=True)
class ScheduledSeq:
    """Compute K/V for seq's positions num_computed_tokens .. + num_new_tokens - 1."""

    seq: Sequence
    num_new_tokens: int
    # This step reaches the seq's last token, so its logits are sampled.
    is_sampling: bool
    # This step reaches the last token of a seq that samples nothing (max_tokens 0).
    is_scored_only: bool = False


@dataclass
class SchedulerOutput:
    """One step's batch: what the model runner computes, in this order."""

    scheduled: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def sampling_seqs(self) -> list[Sequence]:
        """The sequences that sample this step, in batch order (the sampler's rows)."""
        return [s.seq for s in self.scheduled if s.is_sampling]

    @property
    def scored_seqs(self) -> list[Sequence]:
        """The sequences whose prompt this step completes without sampling (max_tokens 0)."""
        return [s.seq for s in self.scheduled if s.is_scored_only]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _scheduled(seq: Sequence, num_new_tokens: int) -> ScheduledSeq:
    reaches_end = seq.num_computed_tokens + num_new_tokens == seq.num_tokens
    has_budget = seq.num_output_tokens < seq.max_tokens
    return ScheduledSeq(
        seq, num_new_tokens, reaches_end and has_budget, reaches_end and not has_budget
    )


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        if block_manager.block_size != config.block_size:
            raise ValueError(
                f"block manager block_size {block_manager.block_size} != {config.block_size}"
            )
        max_blocks_per_seq = -(-config.max_model_len // config.block_size)
        if block_manager.num_blocks < max_blocks_per_seq:
            # A sequence that can never fit alone would block the waiting queue forever.
            raise ValueError(
                f"KV pool of {block_manager.num_blocks} blocks x {config.block_size} tokens "
                f"cannot hold one sequence of max_model_len={config.max_model_len} tokens"
            )
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[Sequence] = deque()
        # Admission order; dict so the most recent admission pops in O(1).
        self.running: dict[int, Sequence] = {}
        self._by_request: dict[str, list[Sequence]] = {}

    # ---- queries --------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.running or self.waiting)

    # ---- queue changes ----------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence (the engine has checked it fits max_model_len)."""
        assert seq.status is SequenceStatus.WAITING and not seq.block_table, seq
        if seq.num_tokens > self.config.max_model_len:
            raise ValueError(
                f"sequence of {seq.num_tokens} tokens exceeds max_model_len "
                f"{self.config.max_model_len}"
            )
        self.waiting.append(seq)
        self._by_request.setdefault(seq.request_id, []).append(seq)

    def finish(self, seq: Sequence, reason: str | None = None) -> None:
        """Take a finished sequence out and free its blocks (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            del self.running[seq.seq_id]
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        if reason is not None:
            seq.finish_reason = reason
        siblings = self._by_request.get(seq.request_id)
        if siblings is not None:
            siblings.remove(seq)
            if not siblings:
                del self._by_request[seq.request_id]

    def abort(self, request_id: str) -> list[Sequence]:
        """Finish every unfinished sequence of a request with reason "abort"; returns them."""
        seqs = list(self._by_request.get(request_id, ()))
        for seq in seqs:
            self.finish(seq, "abort")
        return seqs

    def _preempt(self, seq: Sequence) -> None:
        del self.running[seq.seq_id]
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        logger.debug("preempted %r", seq)

    def _computes_shareable(self, seq: Sequence) -> bool:
        """Whether seq still has to compute full prompt blocks a sibling could hit."""
        bs = self.config.block_size
        return seq.num_computed_tokens < (seq.num_prompt_tokens - 1) // bs * bs

    # ---- one step ---------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's batch; reserves blocks for every scheduled token."""
        bm = self.block_manager
        budget = self.config.max_num_batched_tokens
        scheduled: dict[int, ScheduledSeq] = {}
        preempted: list[Sequence] = []
        decodes: list[Sequence] = []
        prefills: list[Sequence] = []
        max_model_len = self.config.max_model_len
        for seq in self.running.values():
            num_left = len(seq.token_ids) - seq.num_computed_tokens
            assert num_left > 0 and len(seq.token_ids) <= max_model_len, seq
            (decodes if num_left == 1 else prefills).append(seq)
        # Requests with a choice still computing its prompt (n > 1): the other choices
        # wait so they reuse its prompt blocks from the prefix cache, not recompute them.
        prefilling_requests = {s.request_id for s in prefills if self._computes_shareable(s)}

        running = SequenceStatus.RUNNING
        for seq in decodes + prefills:
            if seq.status is not running:
                continue  # preempted earlier in this loop
            num_tokens = len(seq.token_ids)
            num_new = min(num_tokens - seq.num_computed_tokens, budget)
            if num_new == 0:
                continue
            num_blocks = bm.num_blocks_needed(seq, num_new)
            if num_blocks:
                # Make room by preempting the most recent admission, possibly seq itself.
                while num_blocks > bm.num_free_blocks:
                    victim = next(reversed(self.running.values()))
                    undone = scheduled.pop(victim.seq_id, None)
                    if undone is not None:
                        budget += undone.num_new_tokens
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is seq:
                        break
                if seq.status is not running:
                    continue
                bm.append(seq, num_new)
            scheduled[seq.seq_id] = _scheduled(seq, num_new)
            budget -= num_new

        # After a preemption the pool is full: admitting now would only thrash.
        caching = bm.enable_prefix_caching
        while (
            not preempted
            and self.waiting
            and budget > 0
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            # (one that needs prompt logprobs skips the cache: waiting would gain it nothing)
            if caching and seq.request_id in prefilling_requests and not seq.needs_prompt_logprobs:
                break
            num_cached = bm.get_num_computed_from_cache(seq)
            num_new = min(seq.num_tokens - num_cached, budget)
            if not bm.can_allocate(seq, num_new):
                break  # first come first served: nobody overtakes the head
            self.waiting.popleft()
            bm.allocate(seq, num_new)
            assert seq.num_computed_tokens == num_cached, seq
            seq.status = SequenceStatus.RUNNING
            self.running[seq.seq_id] = seq
            scheduled[seq.seq_id] = _scheduled(seq, num_new)
            budget -= num_new
            if self._computes_shareable(seq):
                prefilling_requests.add(seq.request_id)

        return SchedulerOutput(list(scheduled.values()), preempted)

    def update(
        self, scheduled: SchedulerOutput | list[ScheduledSeq], sampled_token_ids: list[int]
    ) -> list[Sequence]:
        """Record a finished step: mark K/V computed, append sampled tokens.

        `sampled_token_ids` holds one token per scheduled seq with is_sampling, in batch
        order (the sampler's output, row for row). Returns the sequences that got a new
        token, in batch order. Sequences finished or aborted since `schedule()` are skipped.
        """
        if isinstance(scheduled, SchedulerOutput):
            scheduled = scheduled.scheduled
        bm = self.block_manager
        grown: list[Sequence] = []
        num_sampled = 0
        for item in scheduled:
            seq = item.seq
            if item.is_sampling:
                token_id = sampled_token_ids[num_sampled]
                num_sampled += 1
            if seq.status is not SequenceStatus.RUNNING:
                continue
            bm.mark_computed(seq, item.num_new_tokens)
            if item.is_sampling:
                seq.append_token(token_id)
                grown.append(seq)
        assert num_sampled == len(sampled_token_ids), "one sampled token per sampling seq"
        return grown
