"""One request's generation: its engine streams merged, aborted on disconnect, closed once.

`Generation` submits the prompts (engine refusals become HTTP errors before anything is sent)
and yields their deltas; `GenerationEvents` wraps a stream's SSE events so closing them also
closes the generation. The handlers in server/openai_api.py turn the deltas into responses.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

from model.errors import QueueFull, RequestRejected
from server.api.outputs import Output
from server.http.errors import HTTPError
from server.http.messages import Request


class Generation:
    """One request's engine streams (one per prompt), merged; aborted on disconnect or close."""

    def __init__(
        self, engine: Any, request: Request, request_ids: list[str], retry_after_s: int = 1
    ) -> None:
        self.engine = engine
        self.retry_after_s = retry_after_s
        self.request = request
        self.request_ids = request_ids
        self.iterators: list[Any] = []
        self.unfinished = set(request_ids)
        self.disconnected = asyncio.get_running_loop().create_future()
        self._tasks: list[asyncio.Task] = []

    def _on_disconnect(self) -> None:
        self.abort()
        if not self.disconnected.done():
            self.disconnected.set_result(None)

    def abort(self) -> None:
        for rid in self.unfinished:
            self.engine.abort(rid)

    async def start(self, prompts: list[list[int]], params: list[Any]) -> None:
        """Submits every prompt; engine refusals become HTTP errors before anything is sent."""
        self.request.add_disconnect_callback(self._on_disconnect)
        try:
            for rid, prompt_ids, p in zip(self.request_ids, prompts, params, strict=True):
                iterator = self.engine.generate(rid, prompt_ids, p)
                if inspect.isawaitable(iterator):
                    iterator = await iterator
                self.iterators.append(iterator)
        except QueueFull as exc:
            await self.close()
            retry = [("Retry-After", str(self.retry_after_s))]
            raise HTTPError(429, str(exc), headers=retry) from None
        except RequestRejected as exc:
            await self.close()
            raise HTTPError(400, str(exc), param=exc.param) from None
        except BaseException:
            await self.close()
            raise
        if self.disconnected.done():  # gone before the engine had the request: abort it now
            self.abort()

    async def deltas(self) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, GenerationDelta) in arrival order until every choice finished."""
        if len(self.iterators) == 1:
            async for delta in self.iterators[0]:
                yield 0, delta
            self.unfinished.clear()
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, iterator: Any) -> None:
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

    async def close(self) -> None:
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


class GenerationEvents:
    """The SSE event iterator; closing it cleans up even if it was never started."""

    def __init__(self, events: AsyncIterator[Any], gen: Generation, output: Output) -> None:
        self.events = events
        self.gen = gen
        self.output = output

    def __aiter__(self) -> GenerationEvents:
        return self

    def __anext__(self) -> Any:
        return self.events.__anext__()

    async def aclose(self) -> None:
        await self.events.aclose()
        await self.gen.close()
        self.output.on_closed()
