"""A connection after a WebSocket upgrade (RFC 6455, through wsproto, with
permessage-deflate), as the ASGI websocket scope.

At a stop the app is told first (`websocket.disconnect`, code 1012) and the
client then gets a close frame with code 1012 (Service Restart), at once or
after `websocket_drain_timeout` seconds, so it reconnects to the new
generation instead of being cut when graceful_timeout runs out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from urllib.parse import unquote

import structlog

from ..http.wsgi import _date_line
from .flow import WriteFlow
from .server import ASGI_INFO

try:
    from wsproto import ConnectionType, WSConnection
    from wsproto.connection import ConnectionState
    from wsproto.events import (AcceptConnection, BytesMessage, CloseConnection, Message, Ping,
                                RejectConnection, Request, TextMessage)
    from wsproto.extensions import PerMessageDeflate
    from wsproto.utilities import RemoteProtocolError
except ImportError:  # optional: pip install 'appd[asgi]'
    WSConnection = None

_log = structlog.get_logger()
SERVICE_RESTART = 1012
MAX_MESSAGE = 16 * 1024 * 1024  # larger messages close the connection with 1009
QUEUE_HIGH_WATER = 64           # messages the app has not read yet before reading pauses
CLOSE_WAIT_S = 2.0              # how long the client has to answer our close frame
NO_WSPROTO = "WebSocket upgrade refused: wsproto is not installed (pip install 'appd[asgi]')"


def start_websocket(http, method: bytes, url: bytes, headers: list, rest: bytes) -> None:
    """Take over `http`'s transport for a WebSocket handshake."""
    if WSConnection is None:
        _log.error("websocket_unavailable", detail=NO_WSPROTO)
        body = NO_WSPROTO.encode() + b"\n"
        http.write(b"HTTP/1.1 501 Not Implemented\r\nContent-Type: text/plain; charset=utf-8\r\n"
                   b"Content-Length: %d\r\nConnection: close\r\n%b\r\n%b"
                   % (len(body), _date_line().encode("latin-1"), body))
        http.close(linger=True)
        return
    ws = WebSocketProtocol(http, url, headers)
    http.server.connections.discard(http)
    http.server.connections.add(ws)
    http.transport.set_protocol(ws)
    if http.read_paused:
        ws.transport.resume_reading()
    raw = [method, b" ", url, b" HTTP/1.1\r\n"]
    for name, value in headers:
        raw += [name, b": ", value, b"\r\n"]
    raw.append(b"\r\n")
    ws.data_received(b"".join(raw) + rest)
    if http.server.stopping:
        ws.on_stop()


class WebSocketProtocol(WriteFlow, asyncio.Protocol):
    def __init__(self, http, url: bytes, headers: list) -> None:
        self.server = http.server
        self.loop = http.loop
        self.transport = http.transport
        self.listener, self.client = http.listener, http.client
        self.url, self.headers = url, headers
        self.conn = WSConnection(ConnectionType.SERVER)
        self.inbox: deque = deque()
        self.waiter: asyncio.Future | None = None
        self.writable: asyncio.Future | None = None
        self.write_paused = self.read_paused = False
        self.handshake_done = False  # accepted or rejected
        self.app_told_closed = False  # the app got websocket.disconnect
        self.fragments: list = []
        self.fragment_size = 0
        self.deadline = 0.0
        self.started = time.monotonic()

    # --- asyncio callbacks ---

    def data_received(self, data: bytes) -> None:
        try:
            self.conn.receive_data(data)
            for event in self.conn.events():
                self._on_event(event)
        except RemoteProtocolError as exc:
            _log.info("websocket_protocol_error", detail=str(exc))
            if exc.event_hint is not None and not self.handshake_done:
                self._write(self.conn.send(exc.event_hint))
            self._tell_app_closed(1002)
            self.transport.close()

    def eof_received(self):
        return None

    def connection_lost(self, exc) -> None:
        self.server.remove(self)
        self._tell_app_closed(1006)
        self._release_writers()

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release_writers()

    # --- from the client ---

    def _on_event(self, event) -> None:
        if isinstance(event, Request):
            self._start_app(event)
        elif isinstance(event, (TextMessage, BytesMessage)):
            self._on_message(event)
        elif isinstance(event, Ping):
            self._write(self.conn.send(event.response()))
        elif isinstance(event, CloseConnection):
            if self.conn.state == ConnectionState.REMOTE_CLOSING:
                self._write(self.conn.send(event.response()))
            self._tell_app_closed(event.code)
            self.transport.close()

    def _on_message(self, event) -> None:
        self.fragments.append(event.data)
        self.fragment_size += len(event.data)
        if self.fragment_size > MAX_MESSAGE:
            self.close(1009, "message too big")
            return
        if not event.message_finished:
            return
        key = "text" if isinstance(event, TextMessage) else "bytes"
        data = self.fragments[0] if len(self.fragments) == 1 else (
            "" if key == "text" else b"").join(self.fragments)
        self.fragments, self.fragment_size = [], 0
        self._deliver({"type": "websocket.receive", key: data})
        if len(self.inbox) >= QUEUE_HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _start_app(self, request) -> None:
        path, _, query = self.url.partition(b"?")
        scope = {
            "type": "websocket", "asgi": ASGI_INFO, "http_version": "1.1", "scheme": "ws",
            "server": self.listener, "client": self.client, "root_path": "",
            "path": unquote(path.decode("latin-1")), "raw_path": path, "query_string": query,
            "headers": self.headers, "subprotocols": list(request.subprotocols),
        }
        state = self.server.scope_state()
        if state is not None:
            scope["state"] = state
        self.inbox.append({"type": "websocket.connect"})
        self.loop.create_task(self._run_app(scope))

    async def _run_app(self, scope: dict) -> None:
        try:
            await self.server.app(scope, self.receive, self.send)
        except Exception:
            _log.error("app_error", exc_info=True, path=scope["path"])
            self.close(1011, "internal error")
        else:
            if not self.handshake_done:
                self._reject(500)
            else:
                self.close(1000, "")
        finally:
            self.server.count_request()

    # --- the app's side ---

    async def receive(self) -> dict:
        while not self.inbox:
            self.waiter = self.loop.create_future()
            await self.waiter
        message = self.inbox.popleft()
        if self.read_paused and len(self.inbox) < QUEUE_HIGH_WATER // 2:
            self.read_paused = False
            self.transport.resume_reading()
        return message

    async def send(self, message: dict) -> None:
        kind = message["type"]
        if self.app_told_closed or self.transport.is_closing():
            return  # the app learns from receive(); nothing can be written any more
        if kind == "websocket.accept" and not self.handshake_done:
            self._accept(message)
        elif kind == "websocket.close" and not self.handshake_done:
            self._reject(403)
        elif kind == "websocket.send" and self.handshake_done:
            text = message.get("text")
            self._write(self.conn.send(Message(data=text if text is not None else message.get("bytes", b""))))
            if self.write_paused:
                await self.drain()
        elif kind == "websocket.close":
            self.close(message.get("code", 1000), message.get("reason") or "")
        else:
            raise RuntimeError(f"unexpected ASGI message {kind!r} on a websocket")

    def _accept(self, message: dict) -> None:
        self.handshake_done = True
        headers = [(bytes(n), bytes(v)) for n, v in message.get("headers") or ()]
        self._write(self.conn.send(AcceptConnection(subprotocol=message.get("subprotocol"),
                                                    extensions=[PerMessageDeflate()],
                                                    extra_headers=headers)))
        self._log_access(101)

    def _reject(self, status: int) -> None:
        self.handshake_done = True
        self._write(self.conn.send(RejectConnection(status_code=status, has_body=False)))
        self._log_access(status)
        self._tell_app_closed(1006)
        self.transport.close()

    # --- closing ---

    def close(self, code: int, reason: str = "") -> None:
        """Send a close frame (once) and wait a little for the client's."""
        if self.conn.state == ConnectionState.OPEN:
            self._write(self.conn.send(CloseConnection(code=code, reason=reason)))
            self.deadline = self.loop.time() + CLOSE_WAIT_S
        elif not self.handshake_done and not self.transport.is_closing():
            self.transport.close()
        self._tell_app_closed(code)

    def on_stop(self) -> None:
        """The worker stops: 1012 now, or after websocket_drain_timeout."""
        delay = self.server.ws_drain_timeout
        if delay:
            self.loop.call_later(delay, self.restart)
        else:
            self.restart()

    def restart(self) -> None:
        if self.transport.is_closing():
            return
        self._tell_app_closed(SERVICE_RESTART)
        if self.handshake_done:
            self.close(SERVICE_RESTART, "service restart")
        else:
            self._reject(503)

    def on_deadline(self) -> None:
        self.deadline = 0.0
        self.transport.close()  # the client never answered our close frame

    def is_idle(self) -> bool:
        return False

    # --- plumbing ---

    def _tell_app_closed(self, code: int) -> None:
        if not self.app_told_closed:
            self.app_told_closed = True
            self._deliver({"type": "websocket.disconnect", "code": code})

    def _deliver(self, message: dict) -> None:
        self.inbox.append(message)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _write(self, data: bytes) -> None:
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def _log_access(self, status: int) -> None:
        access_log = self.server.access_log
        if access_log:
            path, _, query = self.url.partition(b"?")
            scope = {"method": "GET", "path": unquote(path.decode("latin-1")), "raw_path": path,
                     "query_string": query, "client": self.client, "headers": self.headers}
            access_log.write_asgi(scope, status, 0, time.monotonic() - self.started)
