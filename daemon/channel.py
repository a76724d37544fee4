"""A non-blocking stream of framed msgpack messages, driven by a Loop.

The daemon uses one per master (the APPD_CHANNEL_FD socketpair) and one per
control client; a master uses one to talk to its daemon. Writes are buffered
and flushed when the socket is writable, so a slow peer never blocks the loop.
"""

from __future__ import annotations

import selectors
import socket
import time
from typing import Callable

from appdctl.protocol import MAX_FRAME, FrameDecoder, ProtocolError, encode, error_reply


class Channel:
    def __init__(self, loop, sock: socket.socket, on_message: Callable[["Channel", object], None],
                 on_close: Callable[["Channel", str], None], max_frame: int = MAX_FRAME,
                 max_outbuf: int = 16 * MAX_FRAME, parting_error: bool = False):
        self.loop = loop
        self.sock = sock
        self.on_message = on_message
        self.on_close = on_close
        self.decoder = FrameDecoder(max_frame)
        self.outbuf = bytearray()
        self.max_outbuf = max_outbuf
        self.parting_error = parting_error
        self.closed = False
        self.last_activity = time.monotonic()
        sock.setblocking(False)
        loop.add_reader(sock, self._ready)

    def send(self, message: dict) -> None:
        if self.closed:
            return
        try:
            frame = encode(message)
        except ProtocolError as exc:  # a reply too big for a frame: say so rather than lose it
            frame = encode(error_reply(message.get("id"), "internal", f"reply not sent: {exc.message}"))
        self.outbuf += frame
        if len(self.outbuf) > self.max_outbuf:
            self.close("peer does not read its replies")
            return
        self._flush()

    def _flush(self) -> None:
        try:
            while self.outbuf:
                sent = self.sock.send(self.outbuf)
                del self.outbuf[:sent]
        except BlockingIOError:
            pass
        except OSError as exc:
            self.close(f"write failed: {exc.strerror or exc}")
            return
        if not self.closed:
            self.loop.set_events(self.sock, self._ready, write=bool(self.outbuf))

    def _ready(self, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self._flush()
        if self.closed or not mask & selectors.EVENT_READ:
            return
        try:
            data = self.sock.recv(262144)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.close(f"read failed: {exc.strerror or exc}")
            return
        if not data:
            self.close("closed by peer")
            return
        self.last_activity = time.monotonic()
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """Decode `data` as if read from the socket and deliver its messages."""
        try:
            messages = self.decoder.feed(data)
        except ProtocolError as exc:
            # Past garbage framing no later byte can be trusted: close, after
            # a parting error that says why when the peer is an operator.
            if self.parting_error:
                self.send(error_reply(None, exc.code, f"{exc.message}; closing the connection"))
            self.close(exc.message)
            return
        for message in messages:
            if self.closed:
                break
            self.on_message(self, message)

    def unread(self) -> bytes:
        """Bytes received but not yet a whole message (carried across a daemon re-exec)."""
        return bytes(self.decoder.buffer)

    def flush_pending(self, timeout: float = 1.0) -> None:
        """Send what is buffered, blocking at most `timeout`. Used just before exit or exec."""
        if not self.closed and self.outbuf:
            self.sock.settimeout(timeout)
            try:
                self.sock.sendall(self.outbuf)
                self.outbuf.clear()
            except OSError:
                pass
            finally:
                self.sock.setblocking(False)

    def flush_and_close(self, timeout: float = 1.0) -> None:
        self.flush_pending(timeout)
        self.close("done")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.loop.remove(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        self.on_close(self, reason)
