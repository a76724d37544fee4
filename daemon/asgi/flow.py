"""Write backpressure shared by the asgi worker's protocols: while the
transport's buffer is above its high-water mark, a sender awaits drain()
until resume_writing (or the connection's end) releases it."""

from __future__ import annotations

import asyncio


class WriteFlow:
    """Mixed into an asyncio.Protocol that sets `self.loop` and `self.writable = None`."""

    async def drain(self) -> None:
        if self.writable is None:
            self.writable = self.loop.create_future()
        await asyncio.shield(self.writable)

    def _release_writers(self) -> None:
        waiter, self.writable = self.writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
