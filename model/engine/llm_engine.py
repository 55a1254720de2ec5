"""The continuous-batching engine: LLMEngine's step() loop and its request bookkeeping.

One step: `Scheduler.schedule()` picks the batch -> `ModelRunner.run(scheduled)` computes it,
samples the sequences that reach their last token and scores the prompt tokens of those that
asked for prompt logprobs (kept on the sequence until its first delta) -> `Scheduler.update(...)`
appends the sampled tokens (in batch order) to the sequences -> `OutputProcessor.process(...)`
turns each token into a delta and says when a sequence is finished -> `Scheduler.finish(...)`.
A sequence with max_tokens 0 only scores its prompt: the step that completes the prompt ends it
with "length" and no tokens.
AsyncEngine (model.engine.async_engine) runs this loop in a thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace

from model.engine.block_manager import BlockManager
from model.engine.config import EngineConfig
from model.engine.model_runner import ModelRunner
from model.engine.output_processor import OutputProcessor
from model.engine.outputs import (
    EngineStats,
    GenerationDelta,
    Output,
    PromptLogprob,
    merge_deltas,
)
from model.engine.scheduler import Scheduler, SchedulerConfig
from model.engine.sequence import Sequence
from model.errors import EngineError, RequestRejected
from model.sample.metadata import SamplingRow, make_generator
from model.sampling_params import SamplingParams, check_prompt_ids, resolve_max_tokens
from model.structured import GrammarCompiler, GrammarMatcher, VocabIndex
from model.text.tokenizer import Tokenizer

logger = logging.getLogger("nanoserve.engine")


@dataclass
class _Request:
    request_id: str
    params: SamplingParams
    arrival_time: float
    seqs: list[Sequence] = field(default_factory=list)  # one per choice, by choice_index


class LLMEngine:
    """Synchronous engine core; AsyncEngine runs its step() loop in a thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        if config.tensor_parallel_size > 1:  # rank 0: start the workers, then load our shard
            from model.engine.distributed import TPDriver

            driver = TPDriver(config)
            self.runner = ModelRunner(config, driver.tp, driver)
        else:
            self.runner = ModelRunner(config)
        self.model_config = self.runner.model_config
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        if self.runner.device.type == "cuda":
            num_blocks = self.runner.num_blocks_for_gpu(
                config.gpu_memory_utilization, config.max_num_batched_tokens
            )
        else:
            num_blocks = config.kv_cache_memory_bytes // self.runner.block_bytes
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        if num_blocks < max_blocks_per_seq:
            fits = num_blocks * config.block_size
            if num_blocks < 2:
                raise ValueError("the KV cache budget does not hold a single block; raise it")
            # An explicit --max-model-len that does not fit deserves a warning; the model's own
            # context length is only a ceiling.
            log = logger.warning if config.max_model_len else logger.info
            log(
                "KV cache holds %d tokens, fewer than max_model_len %d; max_model_len lowered",
                fits,
                self.max_model_len,
            )
            self.max_model_len = fits
        self.runner.allocate_kv_cache(num_blocks)
        # Tensor parallel: decode runs eagerly (no collectives inside captured graphs).
        if (
            self.runner.device.type == "cuda"
            and not config.enforce_eager
            and config.tensor_parallel_size == 1
        ):
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
        # CPU, quantized: the decode step of one sequence compiled (model/engine/cpu_decode.py).
        if (
            self.runner.device.type == "cpu"
            and self.runner.quantized_weights
            and not config.enforce_eager
            and config.tensor_parallel_size == 1
            and config.attn_backend == "torch"
        ):
            self.runner.compile_lone_decode()
        self.block_manager = BlockManager(
            num_blocks, config.block_size, config.enable_prefix_caching
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.max_num_batched_tokens,
                max_model_len=self.max_model_len,
                block_size=config.block_size,
            ),
            self.block_manager,
        )
        self.stop_ids_eos = frozenset(self.tokenizer.eos_token_ids)
        self.output_processor = OutputProcessor(
            self.tokenizer, self.stop_ids_eos, self.max_model_len
        )
        self._requests: dict[str, _Request] = {}
        self._grammar_compiler: GrammarCompiler | None = None
        self._grammar_lock = threading.Lock()
        self.num_preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.load_time_s = time.perf_counter() - t0

    # ---- requests -------------------------------------------------------------------------

    @property
    def num_kv_tokens(self) -> int:
        return self.runner.num_blocks * self.config.block_size

    def resolve_params(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Checks that a request can ever run; fills max_tokens. Raises RequestRejected.

        The same checks (model.sampling_params) the API layer runs before it calls generate."""
        vocab = self.model_config.vocab_size
        check_prompt_ids(prompt_ids, vocab)
        max_tokens = resolve_max_tokens(
            len(prompt_ids), params.max_tokens, params.min_tokens, self.max_model_len, "prompt"
        )
        params.check_token_ids(vocab)
        return replace(params, max_tokens=max_tokens)

    def grammar_compiler(self) -> GrammarCompiler:
        """The structured-output compiler over this tokenizer, built on first use (the
        vocabulary index takes ~1 s for 150k tokens). Thread-safe: the API layer compiles
        specs with it off the engine thread. Masks are as wide as the logits."""
        with self._grammar_lock:
            if self._grammar_compiler is None:
                width = max(self.model_config.vocab_size, self.tokenizer.vocab_size)
                vocab = VocabIndex.from_tokenizer(self.tokenizer, vocab_size=width)
                self._grammar_compiler = GrammarCompiler(vocab)
            return self._grammar_compiler

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already running")
        if params.max_tokens is None or len(prompt_ids) + params.max_tokens > self.max_model_len:
            params = self.resolve_params(prompt_ids, params)
        request = _Request(request_id, params, time.monotonic())
        # n > 1: the scheduler holds siblings back until the first one's prompt blocks are
        # cached, so the prompt is computed once.
        for index in range(params.n):
            seq = self._new_seq(request, prompt_ids, index)
            request.seqs.append(seq)
            self.scheduler.add(seq)
        self._requests[request_id] = request

    def _new_seq(self, request: _Request, prompt_ids: list[int], index: int) -> Sequence:
        params = request.params
        seq = Sequence(
            prompt_ids,
            request_id=request.request_id,
            choice_index=index,
            max_tokens=params.max_tokens,
            arrival_time=request.arrival_time,
            sampling_params=params,
        )
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [PromptLogprob(prompt_ids[0], None, None, [])]
        seed = None if params.seed is None else params.seed + index
        user_stop_ids = set(params.stop_token_ids)
        min_tokens_stop_ids = user_stop_ids | (set() if params.ignore_eos else self.stop_ids_eos)
        # Structured outputs: one matcher per choice, over the request's shared grammar.
        matcher = None
        if params.structured is not None:
            matcher = GrammarMatcher(params.structured, self.stop_ids_eos)
        # The row reads the sequence's own token list: each sampled token is stored once.
        seq.sampling_row = SamplingRow(
            params=params,
            prompt_token_ids=seq.prompt_view(),
            output_token_ids=seq.output_view(),
            generator=make_generator(seed, self.runner.device),
            stop_token_ids_for_min_tokens=min_tokens_stop_ids,
            matcher=matcher,
        )
        self.output_processor.add(seq, params, matcher)
        return seq

    def abort_request(self, request_id: str) -> list[Output]:
        """Takes the request out at once and frees its blocks; returns its final deltas."""
        if self._requests.pop(request_id, None) is None:
            return []
        # The scheduler finishes (and returns) the sequences that had not finished yet.
        return [
            (request_id, self.output_processor.abort(seq))
            for seq in self.scheduler.abort(request_id)
        ]

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[Output]:
        out = self.scheduler.schedule()
        self.num_preemptions_total += len(out.preempted)
        if not out.scheduled:
            return []
        try:
            result = self.runner.run(out.scheduled)
        except Exception as exc:  # a failed step fails its requests, the engine keeps serving
            logger.exception("engine step failed")
            if self.runner.driver is not None:  # ranks may be out of step: nothing can run
                self.runner.driver.fail(f"tensor-parallel step failed: {exc}")
            return self._fail_requests({s.seq.request_id for s in out.scheduled}, exc)
        self.prompt_tokens_total += sum(
            s.num_new_tokens
            for s in out.scheduled
            if s.seq.num_computed_tokens < s.seq.num_prompt_tokens
        )
        for seq, entries in result.prompt_logprobs:
            seq.prompt_logprobs.extend(entries)
        sampled = result.sampled
        token_ids = sampled.token_ids if sampled is not None else []
        self.scheduler.update(out, token_ids)
        outputs: list[Output] = []
        if sampled is not None:
            # The sampler's lists follow the sampling sequences in batch order.
            for seq, token_id, logprob in zip(
                out.sampling_seqs, token_ids, sampled.logprobs, strict=True
            ):
                delta = self.output_processor.process(seq, token_id, logprob)
                if delta.finish_reason is not None:
                    self.scheduler.finish(seq, delta.finish_reason)
                outputs.append((seq.request_id, delta))
        for seq in out.scored_seqs:
            delta = self.output_processor.finish_scored(seq)
            self.scheduler.finish(seq, delta.finish_reason)
            outputs.append((seq.request_id, delta))
        self.generation_tokens_total += len(token_ids)
        self._drop_finished_requests(outputs)
        return outputs

    def _drop_finished_requests(self, outputs: list[Output]) -> None:
        done = {rid for rid, d in outputs if isinstance(d, GenerationDelta) and d.finish_reason}
        for rid in done:
            request = self._requests.get(rid)
            if request is not None and all(s.is_finished for s in request.seqs):
                del self._requests[rid]

    def _fail_requests(self, request_ids: set[str], exc: Exception) -> list[Output]:
        outputs: list[Output] = []
        for rid in request_ids:
            self.abort_request(rid)
            outputs.append((rid, EngineError(f"generation failed: {type(exc).__name__}: {exc}")))
        return outputs

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            kv_cache_usage=bm.usage,
            prefix_cache_hit_ratio=bm.prefix_cache_hit_ratio,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions_total=self.num_preemptions_total,
            num_blocks=bm.num_blocks,
            num_free_blocks=bm.num_free_blocks,
        )

    # ---- offline use ----------------------------------------------------------------------

    def generate(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[GenerationDelta]]:
        """Runs prompts to completion; returns each request's merged deltas per choice."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{i}" for i in range(len(prompts))]
        for rid, prompt, p in zip(ids, prompts, all_params, strict=True):
            self.add_request(rid, prompt, p)
        collected: dict[str, list[GenerationDelta]] = {rid: [] for rid in ids}
        while self.has_unfinished():
            for rid, delta in self.step():
                if isinstance(delta, Exception):
                    raise delta
                collected[rid].append(delta)
        return [merge_deltas(collected[rid]) for rid in ids]
