"""The continuous-batching engine: LLMEngine and its step() loop (asyncio: model.async_engine)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace

import torch

from model.engine.block_manager import BlockManager
from model.engine.config import EngineConfig
from model.engine.model_runner import ModelRunner, RunnerConfig, ScheduledItem
from model.engine.outputs import EngineStats, GenerationDelta, Output, merge_deltas
from model.engine.scheduler import Scheduler, SchedulerConfig
from model.engine.sequence import Sequence
from model.errors import EngineError, RequestRejected
from model.sample.metadata import SamplingRow, TokenLogprobs, make_generator
from model.sampling_params import SamplingParams
from model.text.detokenizer import IncrementalDetokenizer
from model.text.stop_strings import StopStringMatcher
from model.text.tokenizer import Tokenizer

logger = logging.getLogger("nanoserve.engine")


@dataclass
class _SeqState:
    """What the engine keeps per sequence beside the scheduler's Sequence."""

    request: _Request
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    matcher: StopStringMatcher | None
    generator: torch.Generator | None
    row: SamplingRow
    finished: bool = False


@dataclass
class _Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float
    states: list[_SeqState] = field(default_factory=list)


class LLMEngine:
    """Synchronous engine core; AsyncEngine runs its step() loop in a thread."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        t0 = time.perf_counter()
        self.tokenizer = Tokenizer.from_dir(config.model_dir)
        self.runner = ModelRunner(
            RunnerConfig(
                model_dir=str(config.model_dir),
                device=config.device,
                dtype=config.torch_dtype,
                block_size=config.block_size,
                attn_backend=config.attn_backend,
                num_threads=config.num_threads,
                cpu_packed_weights=config.cpu_packed_weights,
            )
        )
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
        if self.runner.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(config.max_num_seqs, self.max_model_len)
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
        self._requests: dict[str, _Request] = {}
        self._seq_states: dict[int, _SeqState] = {}
        self.num_preemptions_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.load_time_s = time.perf_counter() - t0

    # ---- requests -------------------------------------------------------------------------

    @property
    def num_kv_tokens(self) -> int:
        return self.runner.num_blocks * self.config.block_size

    def resolve_params(self, prompt_ids: list[int], params: SamplingParams) -> SamplingParams:
        """Checks that a request can ever run; fills max_tokens. Raises RequestRejected."""
        num_prompt = len(prompt_ids)
        if num_prompt == 0:
            raise RequestRejected("The prompt is empty.", param="prompt")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise RequestRejected(f"Token ids must be in [0, {vocab}).", param="prompt")
        max_tokens = params.max_tokens
        if max_tokens is None:
            max_tokens = self.max_model_len - num_prompt
            if max_tokens < 1:
                raise RequestRejected(
                    f"This model's maximum context length is {self.max_model_len} tokens. "
                    f"However, your prompt has {num_prompt} tokens, which leaves no room for "
                    "the completion.",
                    param="messages",
                )
        elif num_prompt + max_tokens > self.max_model_len:
            raise RequestRejected(
                f"This model's maximum context length is {self.max_model_len} tokens. "
                f"However, you requested {num_prompt + max_tokens} tokens ({num_prompt} in the "
                f"messages, {max_tokens} in the completion). Please reduce the length of the "
                "messages or completion.",
                param="messages",
            )
        try:
            params.check_token_ids(vocab)
            return replace(params, max_tokens=max_tokens)
        except ValueError as exc:
            raise RequestRejected(str(exc), param=_param_of(exc)) from None

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        if request_id in self._requests:
            raise RequestRejected(f"request id {request_id!r} is already running")
        if params.max_tokens is None or len(prompt_ids) + params.max_tokens > self.max_model_len:
            params = self.resolve_params(prompt_ids, params)
        request = _Request(request_id, list(prompt_ids), params, time.monotonic())
        # n > 1: the scheduler holds siblings back until the first one's prompt blocks are
        # cached, so the prompt is computed once.
        for index in range(params.n):
            state = self._new_seq_state(request, index)
            request.states.append(state)
            self.scheduler.add(state.seq)
        self._requests[request_id] = request

    def _new_seq_state(self, request: _Request, index: int) -> _SeqState:
        params = request.params
        seq = Sequence(
            request.prompt_ids,
            request_id=request.request_id,
            choice_index=index,
            max_tokens=params.max_tokens,
            arrival_time=request.arrival_time,
            sampling_params=params,
        )
        seed = None if params.seed is None else params.seed + index
        generator = make_generator(seed, self.runner.device)
        user_stop_ids = set(params.stop_token_ids)
        min_tokens_stop_ids = user_stop_ids | (set() if params.ignore_eos else self.stop_ids_eos)
        row = SamplingRow(
            params=params,
            prompt_token_ids=request.prompt_ids,
            output_token_ids=[],
            generator=generator,
            stop_token_ids_for_min_tokens=min_tokens_stop_ids,
        )
        state = _SeqState(
            request=request,
            seq=seq,
            detokenizer=IncrementalDetokenizer(
                self.tokenizer, request.prompt_ids, params.skip_special_tokens
            ),
            matcher=StopStringMatcher(params.stop, params.include_stop_str_in_output)
            if params.stop
            else None,
            generator=generator,
            row=row,
        )
        self._seq_states[seq.seq_id] = state
        return state

    def abort_request(self, request_id: str) -> list[Output]:
        """Takes the request out at once and frees its blocks; returns its final deltas."""
        request = self._requests.pop(request_id, None)
        if request is None:
            return []
        self.scheduler.abort(request_id)
        outputs: list[Output] = []
        for state in request.states:
            self._seq_states.pop(state.seq.seq_id, None)
            if not state.finished:
                state.finished = True
                outputs.append((request_id, self._delta(state, "", [], None, "abort", None)))
        return outputs

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    # ---- the step -------------------------------------------------------------------------

    def step(self) -> list[Output]:
        out = self.scheduler.schedule()
        self.num_preemptions_total += len(out.preempted)
        if not out.scheduled:
            return []
        items = [
            ScheduledItem(
                s.seq,
                s.num_new_tokens,
                self._seq_states[s.seq.seq_id].row if s.is_sampling else None,
            )
            for s in out.scheduled
        ]
        try:
            result = self.runner.run(items)
        except Exception as exc:  # a failed step fails its requests, the engine keeps serving
            logger.exception("engine step failed")
            return self._fail_requests({i.seq.request_id for i in items}, exc)
        sampled: dict[int, int] = {}
        sampled_logprobs: dict[int, TokenLogprobs | None] = {}
        if result is not None:
            sampling_items = [i for i in items if i.sampling_row is not None]
            for item, token_id, lp in zip(
                sampling_items, result.token_ids, result.logprobs, strict=True
            ):
                sampled[item.seq.seq_id] = token_id
                sampled_logprobs[item.seq.seq_id] = lp
        self.prompt_tokens_total += sum(
            i.num_new_tokens for i in items if i.seq.num_computed_tokens < i.seq.num_prompt_tokens
        )
        self.scheduler.update(out.scheduled, sampled)
        outputs: list[Output] = []
        for item in items:
            seq = item.seq
            token_id = sampled.get(seq.seq_id)
            if token_id is None:
                continue
            state = self._seq_states[seq.seq_id]
            state.row.output_token_ids.append(token_id)
            self.generation_tokens_total += 1
            delta = self._process_token(state, token_id, sampled_logprobs[seq.seq_id])
            if delta is not None:
                outputs.append((seq.request_id, delta))
        self._drop_finished_requests(outputs)
        return outputs

    def _process_token(
        self, state: _SeqState, token_id: int, logprob: TokenLogprobs | None
    ) -> GenerationDelta | None:
        seq, params = state.seq, state.request.params
        num_out = seq.num_output_tokens
        finish: str | None = None
        stop_reason: str | int | None = None
        text = ""
        if token_id in params.stop_token_ids and num_out >= params.min_tokens:
            finish, stop_reason = "stop", token_id
        elif (
            not params.ignore_eos and token_id in self.stop_ids_eos and num_out >= params.min_tokens
        ):
            finish = "stop"
        else:
            text = state.detokenizer.add(token_id)
            if state.matcher is not None:
                text, matched = state.matcher.push(text)
                if matched is not None:
                    finish, stop_reason = "stop", matched
        if finish is None and (
            num_out >= params.max_tokens or seq.num_tokens >= self.max_model_len
        ):
            finish = "length"
        if finish is not None and not isinstance(stop_reason, str):
            # the end: release what the detokenizer and the stop matcher still hold back
            tail = state.detokenizer.flush()
            if state.matcher is not None:
                tail, matched = state.matcher.push(tail)
                if matched is not None:
                    finish, stop_reason = "stop", matched
                else:
                    tail += state.matcher.flush()
            text += tail
        logprobs = [logprob] if logprob is not None else None
        if finish is not None:
            state.finished = True
            self.scheduler.finish(seq, finish)
            self._seq_states.pop(seq.seq_id, None)
        return self._delta(state, text, [token_id], logprobs, finish, stop_reason)

    def _delta(self, state, text, token_ids, logprobs, finish, stop_reason) -> GenerationDelta:
        seq = state.seq
        return GenerationDelta(
            choice_index=seq.choice_index,
            text=text,
            token_ids=token_ids,
            logprobs=logprobs,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            num_output_tokens=seq.num_output_tokens,
        )

    def _drop_finished_requests(self, outputs: list[Output]) -> None:
        done = {rid for rid, d in outputs if isinstance(d, GenerationDelta) and d.finish_reason}
        for rid in done:
            request = self._requests.get(rid)
            if request is not None and all(s.finished for s in request.states):
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


def _param_of(exc: ValueError) -> str | None:
    """SamplingParams errors start with the field's name."""
    word = str(exc).split(" ", 1)[0].strip(":")
    return word if word.isidentifier() else None
