"""A connection as the gthread worker's poller holds it between requests:
idle (kept alive), or with part of a request head read, with the deadlines
that end each state. It also records the bytes read since the connection was
last between requests, so that when the worker stops it can hand the
connection on with exactly the part of the next request it already read."""

from __future__ import annotations

import select
import socket
import ssl
import time

import httptools

from .errors import error_response
from .wsgi import Connection, ServerInfo

RECORD_LIMIT = 64 * 1024  # beyond this since the last idle point, the connection is not handed on
_TIMEOUT_408 = error_response("408 Request Timeout", "")


class Tap:
    """Stands in for the socket the request reader reads from: records what is
    read, and first gives back bytes another worker had already read."""

    __slots__ = ("sock", "pending", "raw", "overflow")

    def __init__(self, sock, pending: bytes = b""):
        self.sock = sock
        self.pending = pending
        self.raw = bytearray()
        self.overflow = False

    def recv(self, size: int, flags: int = 0) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
        else:
            data = self.sock.recv(size, flags)
        if not self.overflow:
            if len(self.raw) + len(data) > RECORD_LIMIT:
                self.overflow = True
                self.raw.clear()
            else:
                self.raw += data
        return data

    def restart(self) -> None:
        """Between requests: nothing read belongs to a request not yet served."""
        self.raw.clear()
        self.overflow = False

    def __getattr__(self, name):
        return getattr(self.sock, name)


class Service:
    """What every turn of a worker's connections is served with, bundled once per
    worker: the app, the access log (or None), the keep-alive and header timeouts,
    what to call after each request, and whether a response may keep its connection
    alive (should_continue, or still_serving for one that cannot be handed on)."""

    __slots__ = ("app", "access_log", "keepalive", "header_timeout", "on_request", "should_continue",
                 "still_serving")

    def __init__(self, app, access_log, keepalive: float, header_timeout: float, on_request,
                 should_continue, still_serving) -> None:
        self.app = app
        self.access_log = access_log
        self.keepalive = keepalive
        self.header_timeout = header_timeout
        self.on_request = on_request
        self.should_continue = should_continue
        self.still_serving = still_serving


# What a wakeup found (Kept.woken) and what a turn ended with (Kept.turn).
SERVE = "serve"    # a whole request (or an error to answer, a setup to do) is here
WAIT = "wait"      # nothing to do yet (a stale wakeup): back into epoll until readable
HEAD = "head"      # the start of a head came: its header_timeout runs, back into epoll
END = "end"        # the client closed between requests: close it
SERVED = "served"  # served, and idle between requests again (its deadline set): back into epoll
CLOSED = "closed"  # the connection closed itself while serving

_monotonic = time.monotonic


class Kept:
    """One connection of the worker, with its state in the poller."""

    __slots__ = ("connection", "reader", "tap", "listener", "idle_until", "head_until",
                 "transferable", "plain", "fd")

    def __init__(self, sock, addr, info: ServerInfo, listener: str, pending: bytes = b""):
        self.connection = Connection(sock, addr, info)
        self.reader = self.connection.reader
        self.fd = sock.fileno()
        self.transferable = info.setup is None or info.setup.transferable
        # Neither TLS nor a PROXY header: never needs a thread to read, never holds
        # decrypted bytes. Asked first on every wakeup, so the usual case is cheap.
        self.plain = info.setup is None or not info.setup.blocking
        self.tap = Tap(sock, pending)
        self.reader.sock = self.tap
        self.listener = listener
        self.idle_until: float | None = None   # keep-alive deadline while no byte of a head came
        self.head_until: float | None = None   # header_timeout deadline once a head started

    @property
    def sock(self):
        return self.connection.sock

    @property
    def needs_thread(self) -> bool:
        """Its heads are read by a thread, not the poller: a PROXY header or TLS
        handshake still to come (blocking, with their own timeouts), or a TLS
        session, whose records the poller cannot read without blocking."""
        if self.plain:
            return False
        connection = self.connection
        if connection.setup is not None:
            return connection.setup.blocking
        return isinstance(connection.sock, ssl.SSLSocket)

    @property
    def decrypted_waiting(self) -> bool:
        """TLS records read and decrypted but not consumed: readable, though the poller cannot see it."""
        if self.plain:
            return False
        sock = self.connection.sock
        return isinstance(sock, ssl.SSLSocket) and sock.pending() > 0

    def request_ready(self) -> bool:
        """A complete head (or an error to answer) is ready: time for a thread."""
        reader = self.reader
        return bool(reader.ready) or reader.error is not None or reader.done

    def woken(self) -> str:
        """A thread woke for this connection: read what came, never waiting, and say
        what to do (SERVE, WAIT, HEAD or END)."""
        if self.request_ready():
            return SERVE
        if not self.plain:
            if self.needs_thread:  # TLS or PROXY: the thread reads (blocking, with timeouts)
                return WAIT if self.idle_for_thread() else SERVE
            if self.decrypted_waiting:
                return SERVE
        if not self.read_waiting():
            return WAIT
        if self.request_ready():
            return SERVE
        return END if self.reader.eof else HEAD

    def turn(self, service: Service) -> str:
        """A thread woke for this connection: serve what came (the requests it has,
        pipelined ones too) and say how the turn ended: WAIT, HEAD, END, SERVED or
        CLOSED. The worker decides where it goes next."""
        woke = self.woken()
        if woke is SERVE:
            should_continue = service.should_continue if self.transferable else service.still_serving
            while True:
                if not self.connection.serve(service.app, service.access_log, service.keepalive,
                                             should_continue, service.on_request, True):
                    return CLOSED
                if not self.more_to_serve():
                    break
            self.hold(_monotonic(), service.keepalive, service.header_timeout)
            return SERVED
        if woke is HEAD:
            self.head_started(_monotonic(), service.header_timeout)
        return woke

    def more_to_serve(self) -> bool:
        """After a turn: a pipelined request (or an error) is parsed already, or TLS
        records are decrypted: serve on instead of waiting in epoll for readiness."""
        return self.request_ready() or self.decrypted_waiting

    def read_waiting(self) -> bool:
        """One read of what arrived, never waiting: True if bytes (or the end of the
        connection) came, False if nothing was there (a stale wakeup)."""
        reader = self.reader
        if reader.sock_timeout is None:
            return reader.read_now()
        if not self.input_waiting():  # a socket a slow send or read left with a timeout
            return False
        reader.fill()
        return True

    def input_waiting(self) -> bool:
        """Bytes (or the client's close) wait in the kernel, unread."""
        try:
            return bool(select.select([self.fd], [], [], 0)[0])
        except (OSError, ValueError):
            return True  # closed under us: let the reader find out

    @property
    def reads_without_blocking(self) -> bool:
        """A plain socket (no TLS, no PROXY header to come, no timeout set): any
        thread, the main one too, can read it with one call that never waits."""
        return self.connection.setup is None and self.reader.sock_timeout is None \
            and not isinstance(self.connection.sock, ssl.SSLSocket)

    def wants_turn(self) -> bool:
        """Work in hand that no readiness will announce: bytes handed on with it not
        read yet, a request already parsed, TLS records already decrypted."""
        return bool(self.tap.pending) or self.request_ready() or self.decrypted_waiting

    def idle_for_thread(self) -> bool:
        """A connection that needs a thread (TLS, PROXY) woke one with nothing to do:
        set up already, no request parsed, nothing decrypted or waiting (a stale wakeup)."""
        return self.connection.setup is None and not self.wants_turn() and not self.input_waiting()

    def hold(self, now: float, keepalive: float, header_timeout: float) -> None:
        """Back in the poller between requests: start the deadline that applies."""
        if self.reader.in_head:
            self.head_until = now + header_timeout
            self.idle_until = None
        else:
            self.tap.restart()
            self.idle_until = now + keepalive
            self.head_until = None

    def head_started(self, now: float, header_timeout: float) -> None:
        if self.head_until is None and self.reader.in_head:
            self.head_until = now + header_timeout
            self.idle_until = None

    def expired(self, now: float) -> str | None:
        """"idle" (keep-alive over: close quietly), "head" (too slow: 408) or None
        (a whole request waits for a thread: no deadline, as in a queue)."""
        if self.request_ready():
            return None
        if self.head_until is not None and now >= self.head_until:
            return "head"
        if self.idle_until is not None and now >= self.idle_until and not self.reader.in_head:
            return "idle"
        return None

    def answer_timeout(self) -> None:
        try:
            self.sock.send(_TIMEOUT_408, socket.MSG_DONTWAIT)  # tiny: fits the send buffer
        except (OSError, ValueError):  # an SSLSocket takes no flags: the close alone then
            pass
        self.close()

    def unread(self) -> bytes | None:
        """The bytes already read of the request not yet served, or None when they
        cannot be known (too much read since the last idle point) or the connection
        cannot move (TLS, PROXY protocol)."""
        if not self.transferable:
            return None
        if self.tap.pending:  # handed to us and not read yet: it travels on as it came
            return self.tap.pending
        if self.request_ready():  # parsed already: served here
            return None
        if not self.reader.in_head:
            return b""
        if self.tap.overflow:
            return None
        return partial_tail(bytes(self.tap.raw))

    def close(self) -> None:
        self.connection.close()


class _Counter:
    __slots__ = ("complete",)

    def __init__(self):
        self.complete = 0

    def on_message_complete(self):
        self.complete += 1


def _completed(data: bytes) -> int:
    counter = _Counter()
    httptools.HttpRequestParser(counter).feed_data(data)
    return counter.complete


def partial_tail(raw: bytes) -> bytes | None:
    """`raw` holds whole requests followed by the start of one more (pipelining):
    return that start. The parser gives no offsets, so find the shortest prefix
    that already completes every whole request (a binary search, run only when
    a connection is handed on in the middle of a head)."""
    try:
        whole = _completed(raw)
        if whole == 0:
            return raw
        low, high = 0, len(raw)
        while low < high:
            middle = (low + high) // 2
            if _completed(raw[:middle]) >= whole:
                high = middle
            else:
                low = middle + 1
        return raw[low:]
    except httptools.HttpParserError:
        return None
