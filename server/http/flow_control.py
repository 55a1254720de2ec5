"""Write-side backpressure of one connection (asyncio's pause_writing / resume_writing).

The transport calls pause_writing once its buffer passes the high-water mark and
resume_writing once it drained below the low-water mark; a writer that sees
is_write_paused awaits drain() before its next write, so a slow client holds at most
one high-water mark of our bytes. connection_lost must call close(): a writer blocked in
drain() is woken (it then sees the disconnect on its cycle) and no writer waits again.
"""

from __future__ import annotations

import asyncio


class FlowControl:
    __slots__ = ("loop", "is_write_paused", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.is_write_paused = False
        self._waiter: asyncio.Future | None = None

    def pause_writing(self) -> None:
        self.is_write_paused = True

    def resume_writing(self) -> None:
        self.is_write_paused = False
        self._wake()

    def close(self) -> None:
        """The connection is gone: wake a blocked writer; drain() never waits again."""
        self.is_write_paused = False
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Wait until the transport's buffer is below the low-water mark (or the client left)."""
        if self.is_write_paused:
            self._waiter = waiter = self.loop.create_future()
            await waiter
