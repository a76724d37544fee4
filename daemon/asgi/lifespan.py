"""The ASGI lifespan protocol: startup runs before the worker counts as ready
(a failure is a boot error carrying the app's message, so the generation is
rolled back with it); shutdown runs at stop, bounded by what is left of
graceful_timeout. Apps without lifespan (Django) raise before their first
receive(); that means "not supported", not "failed"."""

from __future__ import annotations

import asyncio
import traceback

import structlog

from .server import ASGI_INFO

_log = structlog.get_logger()


class LifespanFailed(Exception):
    """Startup failed; the message is the app's own (or its traceback)."""


class Lifespan:
    def __init__(self, app, loop: asyncio.AbstractEventLoop) -> None:
        self.app = app
        self.loop = loop
        self.state: dict = {}
        self.supported = True
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.started = loop.create_future()   # result: None, or the failure message
        self.stopped = loop.create_future()
        self.asked = False                    # the app called receive() at least once
        self.task: asyncio.Task | None = None

    async def startup(self) -> None:
        """Raises LifespanFailed with the app's message."""
        self.task = self.loop.create_task(self._run())
        await self.inbox.put({"type": "lifespan.startup"})
        failure = await asyncio.shield(self.started)
        if failure is not None:
            raise LifespanFailed(failure)

    async def shutdown(self, timeout: float) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        await self.inbox.put({"type": "lifespan.shutdown"})
        try:
            failure = await asyncio.wait_for(asyncio.shield(self.stopped), max(timeout, 0.1))
        except asyncio.TimeoutError:
            _log.warning("lifespan_shutdown_timeout", timeout=round(timeout, 1))
            self.task.cancel()
            return
        if failure is not None:
            _log.error("lifespan_shutdown_failed", detail=failure)

    async def _run(self) -> None:
        scope = {"type": "lifespan", "asgi": ASGI_INFO, "state": self.state}
        try:
            await self.app(scope, self.receive, self.send)
        except Exception:
            if not self.asked:
                self.supported = False
                _log.info("lifespan_unsupported", detail="the app raised before its first receive()")
            else:
                self._settle(traceback.format_exc())
        finally:
            self._settle(None)

    def _settle(self, failure: str | None) -> None:
        for future in (self.started, self.stopped):
            if not future.done():
                future.set_result(failure)

    async def receive(self) -> dict:
        self.asked = True
        return await self.inbox.get()

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set_result(None)
        elif kind == "lifespan.startup.failed":
            self.started.set_result(message.get("message") or "lifespan startup failed")
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set_result(None)
        elif kind == "lifespan.shutdown.failed":
            self.stopped.set_result(message.get("message") or "lifespan shutdown failed")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} in lifespan")
