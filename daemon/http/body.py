"""wsgi.input: the request body, read lazily off the connection as the
application asks for it (RequestReader feeds the parser)."""

from __future__ import annotations

from .errors import BadRequest, ClientDisconnected
from .request import Request, RequestReader

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Input:
    """wsgi.input: the request body, read lazily off the socket.

    Sends `100 Continue` on the first read when the client asked for it and no
    response has started."""

    __slots__ = ("_reader", "_req", "_buf", "continue_pending")

    def __init__(self, reader: RequestReader, req: Request) -> None:
        self._reader = reader
        self._req = req
        self._buf = bytearray()
        self.continue_pending = req.expect_continue and not req.complete

    def _pull(self) -> bytes:
        """Next received body chunk; b"" at the end of the body."""
        req = self._req
        while not req.body:  # None until the first chunk came
            if req.complete:
                return b""
            if req.broken:
                raise BadRequest("malformed request body")
            if self.continue_pending:
                self.continue_pending = False
                try:
                    self._reader.for_sending()  # never a send without a timeout
                    self._reader.sock.sendall(_CONTINUE)
                except OSError as exc:
                    raise ClientDisconnected("client gone before sending the body") from exc
            if self._reader.done and not req.broken:
                req.broken = True  # parsing stopped (upgrade) before this body ended
                continue
            if not self._reader.fill():
                raise ClientDisconnected("client closed the connection mid-body")
        return req.body.popleft()

    def read(self, size: int | None = -1) -> bytes:
        buf = self._buf
        if size is None or size < 0:
            while chunk := self._pull():
                buf += chunk
            data = bytes(buf)
            buf.clear()
            return data
        if not buf:
            # Fast path: hand over a received chunk without copying through buf.
            chunk = self._pull()
            if len(chunk) == size or not chunk:
                return chunk
            buf += chunk
        while len(buf) < size:
            chunk = self._pull()
            if not chunk:
                break
            buf += chunk
        return self._take(size)

    def _take(self, n: int) -> bytes:
        buf = self._buf
        with memoryview(buf) as view:
            data = bytes(view[:n])
        del buf[:n]
        return data

    def readline(self, size: int | None = -1) -> bytes:
        buf = self._buf
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end >= 0:
                end += 1
                break
            if size is not None and 0 <= size <= len(buf):
                end = size
                break
            start = len(buf)
            chunk = self._pull()
            if not chunk:
                end = len(buf)
                break
            buf += chunk
        if size is not None and 0 <= size < end:
            end = size
        return self._take(end)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        lines, total = [], 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if hint is not None and 0 < hint <= total:
                break
        return lines

    def __iter__(self):
        while line := self.readline():
            yield line

    def drain(self, limit: int) -> bool:
        """Discard the unread body so the connection can carry another request.

        False (close instead) if more than `limit` bytes remain, the client
        never got its 100 Continue, or the body cannot be read to its end."""
        req = self._req
        self._buf.clear()
        if req.body:
            req.body.clear()
        if req.complete:
            return True
        if self.continue_pending or req.broken:
            return False
        if req.content_length is not None and req.content_length - req.received > limit:
            return False
        stop_at = req.received + limit
        while not req.complete:
            if req.broken or self._reader.done or req.received > stop_at:
                return False
            if not self._reader.fill():
                return False
            if req.body:
                req.body.clear()
        return True
