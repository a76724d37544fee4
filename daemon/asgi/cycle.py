"""One HTTP request and its response, as the ASGI app sees them: `receive()`
hands out the body as it arrives (100 Continue on first read), `send()`
frames the response (Content-Length, chunked, or close-delimited) and waits
while the client is slow to read, so a streaming response never piles up in
the worker."""

from __future__ import annotations

import asyncio
import time
from http import HTTPStatus

import structlog

from ..http.errors import error_response
from ..http.wsgi import _date_line
from .server import BODY_HIGH_WATER, DRAIN_LIMIT

_log = structlog.get_logger()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_STATUS_LINES: dict[int, bytes] = {}
_DISCONNECT = {"type": "http.disconnect"}
_SKIPPED = {b"connection", b"transfer-encoding", b"keep-alive"}  # framing is ours


_date = ("", b"")


def date_line() -> bytes:
    """The Date header, encoded once a second (wsgi's _date_line changes once a second)."""
    global _date
    text = _date_line()
    if _date[0] is not text:
        _date = (text, text.encode("latin-1"))
    return _date[1]


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = f"HTTP/1.1 {status} {phrase}\r\n".encode("latin-1")
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = line
    return line


class RequestCycle:
    __slots__ = ("proto", "scope", "keep_alive", "expect_continue", "head_only", "started",
                 "chunks", "buffered", "body_complete", "body_done", "content_length", "received",
                 "disconnected", "waiter", "status", "headers", "response_started",
                 "response_complete", "code", "length", "chunked", "sent")

    def __init__(self, proto, scope: dict, keep_alive: bool, expect_continue: bool,
                 content_length: int | None) -> None:
        self.proto = proto
        self.scope = scope
        self.keep_alive = keep_alive
        self.expect_continue = expect_continue
        self.head_only = scope["method"] == "HEAD"
        self.started = time.monotonic()
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.body_complete = False   # the parser saw the end of the body
        self.body_done = False       # the app was given the last body chunk
        self.content_length = content_length
        self.received = 0
        self.disconnected = False
        self.waiter: asyncio.Future | None = None
        self.status = 0
        self.headers = ()
        self.response_started = False
        self.response_complete = False
        self.code = 0                   # the status sent (0: none yet)
        self.length: int | None = None  # Content-Length we promised
        self.chunked = False
        self.sent = 0

    # --- fed by the connection ---

    def feed_body(self, data: bytes) -> None:
        if self.response_complete:
            return  # drained after the response: thrown away
        self.chunks.append(data)
        self.received += len(data)
        self.buffered += len(data)
        if self.buffered > BODY_HIGH_WATER:
            self.proto.pause_reading()
        self._wake()

    def end_body(self) -> None:
        self.body_complete = True
        self._wake()

    def lose_connection(self) -> None:
        self.disconnected = True
        self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def _wait(self) -> None:
        self.waiter = self.proto.loop.create_future()
        await self.waiter

    # --- the app's side ---

    async def run(self, app) -> None:
        try:
            await app(self.scope, self.receive, self.send)
        except Exception:
            _log.error("app_error", exc_info=True, path=self.scope["path"])
            if not self.response_started:
                self.send_error("500 Internal Server Error")
            self.keep_alive = False
        else:
            if not self.response_started:
                _log.error("app_error", path=self.scope["path"], detail="returned without a response")
                self.send_error("500 Internal Server Error")
            elif not self.response_complete:
                self.keep_alive = False  # a cut-off body: the client cannot find the next response
        finally:
            self.response_complete = True
            self._log_access()
            self.proto.cycle_done(self)

    async def receive(self) -> dict:
        if self.expect_continue:
            self.expect_continue = False
            if not self.response_started and not self.body_complete and not self.disconnected:
                self.proto.write(_CONTINUE)
        while not (self.disconnected or self.response_complete):
            if self.chunks or (self.body_complete and not self.body_done):
                return self._take_body()
            if self.body_done:
                await self._wait()  # nothing more to read: wait for a disconnect
            else:
                self.proto.resume_reading()
                await self._wait()
        return _DISCONNECT

    def _take_body(self) -> dict:
        body = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks.clear()
        if self.buffered > BODY_HIGH_WATER:
            self.proto.resume_reading()
        self.buffered = 0
        more = not self.body_complete
        self.body_done = not more
        return {"type": "http.request", "body": body, "more_body": more}

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if not self.response_started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected http.response.start, got {kind!r}")
            self.status = int(message["status"])
            self.headers = message.get("headers") or ()
            self.response_started = True
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected http.response.body, got {kind!r}")
        if self.response_complete:
            raise RuntimeError("response already complete")
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.disconnected:
            if not more:
                self.response_complete = True
            return  # nobody to write to; the app hears http.disconnect from receive()
        self._write_body(body, more)
        if not more:
            self.response_complete = True
            self._wake()
        elif self.proto.write_paused:
            await self.proto.drain()

    # --- writing ---

    def _write_body(self, body: bytes, more: bool) -> None:
        proto = self.proto
        head = None
        if self.status:  # head not out yet
            head = self._head(None if more else len(body))
            self.status = 0
        if self.head_only or not self._may_have_body():
            if head:
                proto.write(head)
            return
        if self.length is not None:
            room = self.length - self.sent
            if len(body) > room:
                body = body[:room]
        self.sent += len(body)
        if self.chunked:
            if body:
                body = b"%x\r\n%b\r\n" % (len(body), body)
            if not more:
                body += b"0\r\n\r\n"
        elif not more and self.length is not None and self.sent < self.length:
            self.keep_alive = False
        if head:
            proto.write(head + body if len(body) < 65536 else head)
            if len(body) >= 65536:
                proto.write(body)
        elif body:
            proto.write(body)

    def _may_have_body(self) -> bool:
        code = self.code
        return not (code < 200 or code == 204 or code == 304)

    def _head(self, known_length: int | None) -> bytes:
        status = self.status
        self.code = status
        parts = [status_line(status)]
        has_date = has_server = False
        for name, value in self.headers:
            lname = name.lower()
            if lname == b"content-length":
                self.length = int(value)
            elif lname in _SKIPPED:
                if lname == b"connection" and value.lower() == b"close":
                    self.keep_alive = False
                continue
            elif lname == b"date":
                has_date = True
            elif lname == b"server":
                has_server = True
            if b"\n" in value or b"\r" in value or b"\n" in name or b"\r" in name:
                raise ValueError(f"header {name!r} contains a line break")
            parts.append(b"%b: %b\r\n" % (name, value))
        bodiless = status < 200 or status == 204 or status == 304
        if self.length is None and not bodiless:
            if known_length is not None:
                self.length = known_length
                parts.append(b"content-length: %d\r\n" % known_length)
            elif self.keep_alive and self.scope["http_version"] == "1.1":
                self.chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends where the connection does
        if self.keep_alive:
            self.keep_alive = self.proto.may_keep_alive(self)
        if not self.keep_alive:
            parts.append(b"connection: close\r\n")
        elif self.scope["http_version"] == "1.0":
            parts.append(b"connection: keep-alive\r\n")
        if not has_date:
            parts.append(date_line())
        if not has_server:
            parts.append(b"server: appd\r\n")
        parts.append(b"\r\n")
        return b"".join(parts)

    def unread_body_blocks_reuse(self) -> bool:
        """True if the rest of the request body is too much (or never asked for) to drain."""
        if self.body_complete:
            return False
        if self.expect_continue:
            return True  # the client waits for 100 Continue that will never come
        remaining = (self.content_length or 0) - self.received
        return self.content_length is None or remaining > DRAIN_LIMIT

    def send_error(self, status: str) -> None:
        self.status = 0
        self.code = int(status[:3])
        self.response_started = True
        self.keep_alive = False
        if not self.disconnected:
            data = error_response(status, _date_line())
            self.sent = len(data)
            self.proto.write(data)

    def _log_access(self) -> None:
        access_log = self.proto.server.access_log
        if access_log:
            status = self.code or (499 if self.disconnected else 500)
            access_log.write_asgi(self.scope, status, self.sent, time.monotonic() - self.started)
