"""One request's generation: its engine streams merged, aborted on disconnect, closed once.

`Generation` submits the prompts (engine refusals become HTTP errors before anything is sent),
yields their deltas and owns the cleanup: `close()` stops the engine streams, aborts what did
not finish and closes the request's `Output` (its metrics) — the one place that happens.
`collect` builds a non-streaming body from the deltas; `GenerationEvents` is a streaming
body's SSE event iterator. The handlers in server/api/handlers.py choose between the two.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from model.errors import EngineError, QueueFull, RequestRejected
from model.sampling_params import SamplingParams
from server.api.engine_client import EngineClient, GenerationDelta
from server.api.fields import rejected
from server.api.outputs import Output
from server.http.errors import HTTPError
from server.http.messages import Request

logger = logging.getLogger("nanoserve.api")


class Generation:
    """One request's engine streams (one per prompt), merged; aborted on disconnect or close."""

    def __init__(
        self,
        engine: EngineClient,
        request: Request,
        request_ids: list[str],
        output: Output,
        retry_after_s: int = 1,
    ) -> None:
        self.engine = engine
        self.request = request
        self.request_ids = request_ids
        self.output = output
        self.retry_after_s = retry_after_s
        self.iterators: list[AsyncIterator[GenerationDelta]] = []
        self.unfinished = set(request_ids)
        self.disconnected = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task] = []
        self._is_closed = False

    def _on_disconnect(self) -> None:
        self.abort()
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def abort(self) -> None:
        for rid in self.unfinished:
            self.engine.abort(rid)

    async def start(self, prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Submits every prompt; engine refusals become HTTP errors before anything is sent
        (the output is left untouched then: the request never ran)."""
        self.request.add_disconnect_callback(self._on_disconnect)
        try:
            for rid, prompt_ids, p in zip(self.request_ids, prompts, params, strict=True):
                self.iterators.append(self.engine.generate(rid, prompt_ids, p))
        except QueueFull as exc:
            await self._stop()
            retry = [("Retry-After", str(self.retry_after_s))]
            raise HTTPError(429, str(exc), headers=retry) from None
        except RequestRejected as exc:
            await self._stop()
            raise rejected(exc) from None
        except BaseException:
            await self._stop()
            raise
        if self.disconnected.done():  # gone before the engine had the request: abort it now
            self.abort()

    async def deltas(self) -> AsyncIterator[tuple[int, GenerationDelta]]:
        """(prompt index, delta) in arrival order until every choice finished."""
        if len(self.iterators) == 1:
            async for delta in self.iterators[0]:
                yield 0, delta
            self.unfinished.clear()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, iterator: AsyncIterator[GenerationDelta]) -> None:
            try:
                async for delta in iterator:
                    queue.put_nowait((index, delta, None))
                queue.put_nowait((index, None, None))
            except Exception as exc:
                queue.put_nowait((index, None, exc))

        self._tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(self.iterators)]
        remaining = len(self.iterators)
        while remaining:
            index, delta, exc = await queue.get()
            if exc is not None:
                raise exc
            if delta is None:
                remaining -= 1
                self.unfinished.discard(self.request_ids[index])
                continue
            yield index, delta

    async def _stop(self) -> None:
        """Stops reading; the engine drops whatever did not finish."""
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for iterator in self.iterators:
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        self.abort()
        self.unfinished.clear()

    async def close(self) -> None:
        """The request is over: engine streams stopped and aborted, the output closed (choices
        still open count as aborted). Idempotent."""
        if self._is_closed:
            return
        self._is_closed = True
        await self._stop()
        self.output.on_closed()


def _failure(exc: Exception) -> HTTPError:
    """The HTTP error a generation that failed mid-way reports."""
    if isinstance(exc, HTTPError):
        return exc
    if isinstance(exc, RequestRejected):
        return rejected(exc)
    return HTTPError(500, f"Generation failed: {exc}")


async def collect(gen: Generation) -> dict[str, Any]:
    """Every delta into the output, then the non-streaming response body."""
    output = gen.output
    try:
        async with contextlib.aclosing(gen.deltas()) as deltas:
            async for prompt_index, delta in deltas:
                output.on_delta(prompt_index, delta)
    except (EngineError, RequestRejected) as exc:
        output.on_error()
        raise _failure(exc) from None
    except Exception:  # not ours to word: the server's 500 (and its log)
        output.on_error()
        raise
    finally:
        await gen.close()
    if output.was_aborted:
        if gen.disconnected.done():
            raise HTTPError(499, "Client disconnected.")
        raise HTTPError(503, "The request was aborted by the server.")
    return output.response()


class GenerationEvents:
    """A streaming body's SSE events: the output's chunks per delta, the usage chunk, an
    in-stream error if generation fails after the headers (Output.stream_error), then the
    output's end of stream (Output.stream_end: "[DONE]" for OpenAI's).

    A class rather than an async generator: closing it must close the generation even when
    iteration never started (the client left first), and a generator that never started
    skips its `finally`."""

    def __init__(self, gen: Generation) -> None:
        self.gen = gen
        self._deltas = gen.deltas()
        self._pending: deque[Any] = deque(gen.output.first_chunks())
        self._is_done = False

    def __aiter__(self) -> GenerationEvents:
        return self

    async def __anext__(self) -> Any:
        while not self._pending:
            if self._is_done:
                raise StopAsyncIteration
            await self._next_delta()
        return self._pending.popleft()

    async def _next_delta(self) -> None:
        output = self.gen.output
        try:
            prompt_index, delta = await anext(self._deltas)
            self._pending.extend(output.on_delta(prompt_index, delta))
            return
        except StopAsyncIteration:
            usage = output.usage_chunk()
            if usage is not None:
                self._pending.append(usage)
        except Exception as exc:  # after the headers: report in-stream, then end cleanly
            output.on_error()
            if not isinstance(exc, (HTTPError, RequestRejected)):
                is_engine = isinstance(exc, EngineError)
                logger.error("stream failed: %s", exc, exc_info=None if is_engine else exc)
            self._pending.append(output.stream_error(_failure(exc)))
        self._pending.extend(output.stream_end())
        self._is_done = True

    async def aclose(self) -> None:
        await self._deltas.aclose()
        await self.gen.close()
