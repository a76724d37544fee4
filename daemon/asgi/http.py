"""One HTTP/1.1 connection of the asgi worker (an asyncio Protocol).

httptools parses every byte as it arrives, so pipelined requests queue up
here in order and are answered one after the other. Deadlines are not timers
per request: the connection keeps one `deadline` (the end of the head it is
reading, or of its keep-alive idleness) that the worker checks a few times a
second.

Across a stop (DESIGN.md "Connections across a stop"): the request in hand
finishes, pipelined requests already read are answered; an idle kept-alive
connection is handed to the serving workers when they take it (appd.handoff:
the bytes read since it was last idle travel with it, see `handoff_data`);
otherwise it stays open until its keep-alive deadline, and a request it sends
meanwhile is served and answered with `Connection: close`. Nothing is closed
under a client that may be sending.
"""

from __future__ import annotations

import asyncio
from collections import deque
from urllib.parse import unquote

import httptools

from ..http.errors import BadRequest, HeadersTooLarge, HTTPError, URITooLong, error_response
from ..http.wsgi import _date_line
from ..http.kept import RECORD_LIMIT, partial_tail
from .cycle import RequestCycle
from .flow import WriteFlow
from .server import ASGI_INFO, PIPELINE_DEPTH

LINGER_S = 1.0  # after a refusal, read what the client still sends before closing


class Timeout(HTTPError):
    status = "408 Request Timeout"


def split_url(url: bytes) -> tuple[bytes, bytes]:
    """(raw path, query string) of a request target."""
    if url[:1] != b"/":
        try:
            parsed = httptools.parse_url(url)
            return parsed.path or b"/", parsed.query or b""
        except httptools.HttpParserInvalidURLError:
            return b"/", b""
    path, _, query = url.partition(b"?")
    return path, query.partition(b"#")[0]


class HttpProtocol(WriteFlow, asyncio.Protocol):
    def __init__(self, server, listener, client, name: str = "", carried: bytes | None = None) -> None:
        self.server = server
        self.name = name                # the listener's name, which a handed-on connection carries
        # Handed on by another worker, with what it had read of the next request
        # (None: accepted here). Such a connection was kept alive: idle, not new.
        self.carried = carried
        self.raw = bytearray()          # bytes read since the connection was last idle
        self.raw_overflow = False
        self.loop = server.loop
        self.listener = listener        # (host, port) of the listener, or None for unix
        self.client = client            # (host, port) or None
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.cycle: RequestCycle | None = None     # the request being answered
        self.pipeline: deque[RequestCycle] = deque()
        self.parsing: RequestCycle | None = None   # the request whose body is arriving
        self.url = b""
        self.headers: list = []
        self.in_head = False
        self.head_bytes = 0
        self.limit_error: HTTPError | None = None
        self.refusal: HTTPError | None = None      # answer once the pipeline is empty
        self.upgrade: tuple | None = None          # (websocket request, bytes after its head)
        self.ignoring = False                      # no more requests on this connection
        self.requests_seen = 0
        self.eof = False
        self.deadline = 0.0
        self.read_paused = False
        self.write_paused = False
        self.writable: asyncio.Future | None = None

    # --- asyncio callbacks ---

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.server.connections.add(self)
        if self.carried is not None:
            # Before the transport's first read, so the carried bytes come first.
            self.deadline = self.loop.time() + self.server.keepalive
            data, self.carried = self.carried, b""
            if data:
                self.data_received(data)
        elif self.server.header_timeout:
            self.deadline = self.loop.time() + self.server.header_timeout

    def connection_lost(self, exc) -> None:
        self.server.remove(self)
        self.deadline = 0.0
        for cycle in (self.cycle, *self.pipeline):
            if cycle is not None:
                cycle.lose_connection()
        self.pipeline.clear()
        self._release_writers()

    def data_received(self, data: bytes) -> None:
        if self.ignoring:
            return
        if not self.in_head and self.cycle is None and not self.pipeline:
            self._start_head_deadline()  # first byte of a request on an idle connection
        self._record(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as exc:
            self._on_upgrade(data[exc.args[0]:] if exc.args else b"")
        except httptools.HttpParserError as exc:
            self.refuse(self.limit_error or BadRequest(str(exc)))
        else:
            if self.in_head:
                self.head_bytes += len(data)
                if self.head_bytes > self.server.max_head:
                    self.refuse(HeadersTooLarge("request head too large"))

    def eof_received(self):
        # A client's FIN cannot be told from a half-close; like uvicorn, take it as
        # gone, so an app waiting on receive() hears http.disconnect.
        self.eof = True
        return None

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        self._release_writers()

    # --- httptools callbacks ---

    def on_message_begin(self) -> None:
        self.in_head = True
        self.url = b""
        self.headers = []

    def on_url(self, part: bytes) -> None:
        self.url += part
        limit = self.server.limit_line
        if limit and len(self.url) > limit:
            self._limit(URITooLong("request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        server = self.server
        if server.limit_fields and len(self.headers) >= server.limit_fields:
            self._limit(HeadersTooLarge("too many header fields"))
        if server.limit_field_size and len(name) + len(value) + 2 > server.limit_field_size:
            self._limit(HeadersTooLarge("header field too large"))
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        self.head_bytes = 0
        self.deadline = 0.0
        self.requests_seen += 1
        parser = self.parser
        if parser.should_upgrade() and self._wants_websocket():
            self.upgrade = (parser.get_method(), self.url, self.headers)
            self.parsing = None
            return
        cycle = self._new_cycle(parser)
        self.parsing = cycle
        if self.cycle is None:
            self._start(cycle)
        else:
            self.pipeline.append(cycle)
            if len(self.pipeline) >= PIPELINE_DEPTH:
                self.pause_reading()

    def on_body(self, data: bytes) -> None:
        if self.parsing is not None:
            self.parsing.feed_body(data)

    def on_message_complete(self) -> None:
        if self.parsing is not None:
            self.parsing.end_body()
            self.parsing = None

    def _limit(self, exc: HTTPError) -> None:
        self.limit_error = exc  # httptools wraps callback exceptions; keep ours
        raise exc

    # --- requests ---

    def _new_cycle(self, parser) -> RequestCycle:
        method = parser.get_method().decode("latin-1")
        raw_path, query = split_url(self.url)
        version = parser.get_http_version()
        scope = {
            "type": "http", "asgi": ASGI_INFO, "http_version": version,
            "server": self.listener, "client": self.client, "scheme": "http",
            "method": method, "root_path": "",
            "path": unquote(raw_path.decode("latin-1")) if b"%" in raw_path else raw_path.decode("latin-1"),
            "raw_path": raw_path, "query_string": query, "headers": self.headers,
        }
        state = self.server.scope_state()
        if state is not None:
            scope["state"] = state
        content_length = expect = None
        for name, value in self.headers:
            if name == b"content-length":
                content_length = int(value)
            elif name == b"expect":
                expect = value
        keep_alive = parser.should_keep_alive() and self.server.keepalive > 0
        return RequestCycle(self, scope, keep_alive,
                            expect is not None and expect.lower() == b"100-continue" and version == "1.1",
                            content_length)

    def _start(self, cycle: RequestCycle) -> None:
        self.cycle = cycle
        self.server.active.add(cycle)
        self.loop.create_task(cycle.run(self.server.app))

    def may_keep_alive(self, cycle: RequestCycle) -> bool:
        """Whether the response now starting may leave the connection open: not once
        the worker stops, unless pipelined requests already read still need answers."""
        if self.ignoring or self.refusal is not None:
            return False
        server = self.server
        return not server.stopping or bool(self.pipeline) or (server.handing_off and self.transferable())

    def cycle_done(self, cycle: RequestCycle) -> None:
        server = self.server
        server.active.discard(cycle)
        server.count_request()
        self.cycle = None
        if self.transport.is_closing():
            return
        if not cycle.keep_alive or self.eof or cycle.unread_body_blocks_reuse():
            self.ignoring = True
            self.close(linger=not cycle.body_complete)
            return
        if self.pipeline:
            self._start(self.pipeline.popleft())
            if len(self.pipeline) < PIPELINE_DEPTH:
                self.resume_reading()
            return
        if self.refusal is not None:
            self._send_refusal()
            return
        if self.upgrade is not None:
            self._begin_websocket()
            return
        self.resume_reading()
        if not self.in_head:
            self.raw.clear()  # an idle point: nothing read belongs to a request not yet served
            self.raw_overflow = False
            self.deadline = self.loop.time() + server.keepalive
        if (server.stopping or server.handing_off) and server.on_idle is not None:
            server.on_idle(self)  # handed on, if the worker hands connections on (stopping or paused)

    # --- refusals, deadlines, closing ---

    def refuse(self, exc: HTTPError) -> None:
        """Answer a request we will not serve, after the responses owed before it."""
        self.ignoring = True
        self.refusal = exc
        if self.parsing is not None and self.parsing is not self.cycle:
            self.pipeline.remove(self.parsing)  # its head was fine; its body is not
        if self.parsing is not None:
            self.parsing.lose_connection()
        if self.cycle is None and not self.pipeline:
            self._send_refusal()

    def _send_refusal(self) -> None:
        self.write(error_response(self.refusal.status, _date_line()))
        self.close(linger=True)

    def _start_head_deadline(self) -> None:
        timeout = self.server.header_timeout
        self.deadline = self.loop.time() + timeout if timeout else 0.0

    def on_deadline(self) -> None:
        self.deadline = 0.0
        if self.cycle is not None or self.pipeline or self.transport.is_closing():
            return
        kept = self.requests_seen or self.carried is not None  # a kept-alive connection
        if self.in_head or not (kept or self.server.stopping):
            self.refuse(Timeout("request head not received in time"))
        else:
            self.close()  # idle past keep-alive: the client expects this and retries

    def close(self, linger: bool = False) -> None:
        transport = self.transport
        if transport.is_closing():
            return
        if linger and transport.can_write_eof():
            # Closing with unread input sends RST, which can destroy the response
            # before the client reads it: half-close and read a while first.
            self.resume_reading()
            transport.write_eof()
            self.loop.call_later(LINGER_S, transport.close)
        else:
            transport.close()

    # --- flow control ---

    def write(self, data: bytes) -> None:
        if not self.transport.is_closing():
            self.transport.write(data)

    def pause_reading(self) -> None:
        if not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.read_paused and len(self.pipeline) < PIPELINE_DEPTH:
            self.read_paused = False
            self.transport.resume_reading()

    # --- stopping and upgrades ---

    def on_stop(self) -> None:
        """A connection that never sent a byte is idle too: it gets a keep-alive deadline."""
        if self.is_idle() and not self.requests_seen:
            limit = self.loop.time() + self.server.keepalive
            self.deadline = min(self.deadline, limit) if self.deadline else limit

    def _record(self, data: bytes) -> None:
        if self.raw_overflow:
            return
        if len(self.raw) + len(data) > RECORD_LIMIT:
            self.raw_overflow = True
            self.raw.clear()
        else:
            self.raw += data

    def transferable(self) -> bool:
        """Whether the connection may move to another process: not a TLS session,
        whose keys stay here."""
        transport = self.transport
        return transport is not None and transport.get_extra_info("sslcontext") is None

    def handoff_data(self) -> bytes | None:
        """What was read of the next request, for handing the connection on; None
        when it cannot move: a request in hand or owed, a WebSocket upgrade, a
        refusal, the client's EOF, TLS, or too much read to know the request's start."""
        if (self.cycle is not None or self.pipeline or self.upgrade is not None or self.ignoring
                or self.eof or self.transport is None or self.transport.is_closing()
                or not self.transferable()):
            return None
        if not self.in_head:
            return b""
        if self.raw_overflow:
            return None
        return partial_tail(bytes(self.raw))

    def is_idle(self) -> bool:
        """Between keep-alive requests: nothing owed, nothing being read."""
        return self.cycle is None and not self.pipeline and not self.in_head and self.upgrade is None

    def _wants_websocket(self) -> bool:
        for name, value in self.headers:
            if name == b"upgrade" and value.lower() == b"websocket":
                return True
        return False

    def _on_upgrade(self, rest: bytes) -> None:
        if self.upgrade is None:
            self.ignoring = True  # another protocol (h2c, CONNECT): answered as HTTP, then closed
            return
        self.upgrade = (*self.upgrade, rest)
        if self.cycle is None and not self.pipeline:
            self._begin_websocket()

    def _begin_websocket(self) -> None:
        from .websocket import start_websocket
        method, url, headers, rest = self.upgrade
        self.upgrade = None
        self.ignoring = True
        start_websocket(self, method, url, headers, rest)
