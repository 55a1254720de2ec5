"""AsyncEngine: the engine's step loop in its own thread, seen from asyncio as async iterators."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator

from model.engine.config import EngineConfig
from model.engine.llm_engine import LLMEngine
from model.engine.outputs import EngineStats, GenerationDelta, Output, merge_deltas
from model.errors import EngineError, QueueFull, RequestRejected
from model.sampling_params import SamplingParams
from model.structured import GrammarCompiler

logger = logging.getLogger("nanoserve.engine")


class _Stream:
    """Deltas of one request, filled on the event loop by the engine thread's hand-over."""

    __slots__ = ("items", "event", "is_consumed")

    def __init__(self) -> None:
        self.items: list[GenerationDelta | Exception] = []
        self.event = asyncio.Event()
        self.is_consumed = False  # the iterator has started; its `finally` cleans up


class AsyncEngine:
    """Runs LLMEngine.step() in a thread; the event loop never waits on a forward pass.

    Start one with `await AsyncEngine.launch(config)`."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len = engine.max_model_len
        self.max_queued_requests = engine.config.max_queued_requests
        self._loop: asyncio.AbstractEventLoop | None = None
        self._streams: dict[str, _Stream] = {}
        self._queued: set[str] = set()  # admitted here, no output yet
        self._inbox: deque[tuple] = deque()
        self._wake = threading.Condition()
        self._stopped = False
        self._stats = engine.stats()
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------

    @classmethod
    async def launch(cls, config: EngineConfig) -> AsyncEngine:
        """Load the engine in a new thread, then run its step loop in that same thread.

        On the CPU, torch's OpenMP runtime keeps a pool of worker threads per thread that calls
        it: loading in one thread and stepping in another leaves two pools, more threads than
        cores, and libgomp then stops spin-waiting between parallel regions (steps measured
        20-25% slower on 2 cores). Raises what LLMEngine raises.
        """
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[AsyncEngine] = loop.create_future()

        def settle(result: AsyncEngine | None, exc: BaseException | None) -> None:
            if ready.done():  # the caller was cancelled (shutdown while loading)
                return
            if exc is not None:
                ready.set_exception(exc)
            else:
                ready.set_result(result)

        def main() -> None:
            try:
                engine = cls(LLMEngine(config))
            except BaseException as exc:
                loop.call_soon_threadsafe(settle, None, exc)
                return
            engine._loop = loop
            engine._thread = threading.current_thread()
            loop.call_soon_threadsafe(settle, engine, None)
            engine._run()

        threading.Thread(target=main, name="nanoserve-engine", daemon=True).start()
        return await ready

    async def shutdown(self) -> None:
        with self._wake:
            self._stopped = True
            self._wake.notify()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
            self._thread = None

    # ---- requests --------------------------------------------------------------------------

    def generate(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationDelta]:
        """Deltas of every choice until all finish. Raises RequestRejected (the request can never
        run) or QueueFull (too many waiting) at once, before anything is admitted; the iterator
        raises EngineError if a step fails for this request. Closing it early aborts the request."""
        params = self.engine.resolve_params(prompt_ids, params)
        if len(self._queued) >= self.max_queued_requests:
            raise QueueFull(f"{len(self._queued)} requests are already waiting; retry later")
        if request_id in self._streams:
            raise RequestRejected(f"request id {request_id!r} is already running")
        stream = _Stream()
        self._streams[request_id] = stream
        self._queued.add(request_id)
        self._submit(("add", request_id, list(prompt_ids), params))
        return self._deltas(request_id, stream, params.n)

    async def _deltas(
        self, request_id: str, stream: _Stream, num_unfinished: int
    ) -> AsyncIterator[GenerationDelta]:
        stream.is_consumed = True
        try:
            while num_unfinished:
                if not stream.items:
                    stream.event.clear()
                    await stream.event.wait()
                items, stream.items = stream.items, []
                for item in items:
                    if isinstance(item, Exception):
                        num_unfinished = 0
                        raise item
                for delta in merge_deltas(items):
                    if delta.finish_reason is not None:
                        num_unfinished -= 1
                    yield delta
        finally:
            self._streams.pop(request_id, None)
            self._queued.discard(request_id)
            if num_unfinished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Thread-safe and idempotent: the request leaves the batch at the next step."""
        stream = self._streams.get(request_id)
        if stream is not None and not stream.is_consumed:
            # An iterator that never started never runs its `finally`.
            self._streams.pop(request_id, None)
            self._queued.discard(request_id)
        self._submit(("abort", request_id))

    def grammar_compiler(self) -> GrammarCompiler:
        """The engine's structured-output compiler (thread-safe; built on first call)."""
        return self.engine.grammar_compiler()

    def stats(self) -> EngineStats:
        stats = self._stats
        stats.num_waiting = max(stats.num_waiting, len(self._queued) - stats.num_running)
        return stats

    @property
    def num_queued(self) -> int:
        return len(self._queued)

    # ---- the engine thread -----------------------------------------------------------------

    def _submit(self, command: tuple) -> None:
        with self._wake:
            self._inbox.append(command)
            self._wake.notify()

    def _run(self) -> None:
        engine = self.engine
        while True:
            with self._wake:
                while not self._inbox and not engine.has_unfinished() and not self._stopped:
                    self._wake.wait()
                if self._stopped:
                    break
                commands = list(self._inbox)
                self._inbox.clear()
            outputs: list[Output] = []
            for command in commands:
                outputs.extend(self._apply(command))
            if engine.has_unfinished():
                try:
                    outputs.extend(engine.step())
                except Exception as exc:  # keep serving: fail what is in flight, not the process
                    logger.exception("engine step crashed")
                    for rid in list(engine._requests):
                        engine.abort_request(rid)
                        outputs.append((rid, EngineError(f"engine step failed: {exc}")))
            self._stats = engine.stats()
            if outputs:
                self._loop.call_soon_threadsafe(self._dispatch, outputs)
        for rid in list(engine._requests):
            engine.abort_request(rid)

    def _apply(self, command: tuple) -> list[Output]:
        if command[0] == "add":
            _, rid, prompt_ids, params = command
            try:
                self.engine.add_request(rid, prompt_ids, params)
            except Exception as exc:
                logger.exception("could not add request %s", rid)
                return [(rid, exc if isinstance(exc, RequestRejected) else EngineError(str(exc)))]
            return []
        _, rid = command
        return self.engine.abort_request(rid)

    def _dispatch(self, outputs: list[Output]) -> None:
        streams = self._streams
        queued = self._queued
        for rid, item in outputs:
            stream = streams.get(rid)
            if stream is None:
                continue
            queued.discard(rid)
            stream.items.append(item)
            stream.event.set()
