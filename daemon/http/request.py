"""Incremental HTTP/1.x request parsing over a blocking socket (httptools).

The parser is push-based: every byte fed is parsed at once, including any
pipelined requests that arrived in the same recv. So the reader only reads
from the socket when it has to (the next request's head is needed, or the app
wants more body), which bounds memory to one recv beyond what is consumed,
and parsed requests queue up in order.

The RFC checks llhttp leaves to us run in its callbacks (see validate.py).
When llhttp refuses a request line only for being stricter than the RFC (an
extension method, raw UTF-8 in the target, HTTP/1.2), the line is checked
here and parsed again relaxed. Reads wake every READ_TICK to keep the worker's
heartbeat going and to answer 408 once a head is later than header_timeout.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque

import httptools

from .errors import (BadRequest, HeadersTooLarge, HTTPError, RequestTimeout,
                     URITooLong, VersionNotSupported)
from .names import _HEADER_KEYS, header_key
from .relax import RelaxedLine
from .validate import FORBIDDEN_TRAILERS, check_host, check_target

RECV_SIZE = 64 * 1024
_DONTWAIT = socket.MSG_DONTWAIT
_monotonic = time.monotonic  # one global, not a module attribute per call
# Cap on a request head when some limit is 0 ("no limit"): still never unbounded.
MAX_HEAD_BYTES = 4 * 1024 * 1024
# While a keep-alive connection is idle, wake this often to check should_continue().
IDLE_POLL_INTERVAL = 0.1
# A blocked recv wakes this often to call on_wait (the sync worker's heartbeat)
# and to check the head deadline.
READ_TICK = 1.0
# "Name: value\r\n" around a field's name and value, as gunicorn counts a field's size.
FIELD_FRAMING = 4
# " HTTP/1.1" after the method, SP and target, as gunicorn counts the request line.
VERSION_FRAMING = 9

_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# Host values already found valid (bounded as above).
_GOOD_HOSTS: set[str] = set()
_GOOD_HOSTS_MAX = 1024


class Request:
    """One parsed request head plus the body bytes received so far."""

    __slots__ = ("method", "url", "version", "fields", "keep_alive", "expect_continue",
                 "content_length", "body", "received", "complete", "broken")

    def __init__(self) -> None:
        self.method = "GET"
        self.url = b""
        self.version = "HTTP/1.1"
        self.fields: dict[str, str] = {}   # environ keys -> values, ready to merge
        self.keep_alive = False
        self.expect_continue = False
        self.content_length: int | None = None
        self.body: deque[bytes] | None = None  # received, not yet read by the app (made at the first)
        self.received = 0
        self.complete = False              # whole body received
        self.broken = False                # body ended by a parse error


class RequestReader(RelaxedLine):
    """Reads requests off one connection; also the httptools callback target."""

    def __init__(self, sock: socket.socket, limit_line: int, limit_fields: int,
                 limit_field_size: int, header_timeout: float = 0.0,
                 read_timeout: float = 30.0, nonblocking_first: bool = False) -> None:
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.limit_line = limit_line
        self.limit_fields = limit_fields
        self.limit_field_size = limit_field_size
        if limit_line and limit_fields and limit_field_size:
            self.max_head = limit_line + 4 + limit_fields * (limit_field_size + 2) + 2
        else:
            self.max_head = MAX_HEAD_BYTES
        self.read_timeout = read_timeout
        self.header_timeout = header_timeout
        # When the head being read must be complete (monotonic; 0: no head yet
        # or no limit). The first head's clock runs from accept.
        self.head_due = _monotonic() + header_timeout if header_timeout else 0.0
        # Reads wait at most a tick at a time (see _recv); sends set read_timeout.
        self.tick = min(READ_TICK, read_timeout, header_timeout or READ_TICK)
        if nonblocking_first and sock.gettimeout() is None:
            # A plain blocking socket stays so while reads and sends need no wait:
            # each is one MSG_DONTWAIT call (a socket with a timeout polls before
            # every call, and switching modes costs a call too). Only a read or a
            # send that would block sets the timeout (see _recv, Response._sendall).
            self.sock_timeout = None
        else:
            self.sock_timeout = self.tick
            sock.settimeout(self.tick)
        self.ready: deque[Request] = deque()  # heads complete, not yet served
        self.current: Request | None = None    # the message being parsed
        self.in_head = False
        self.head_bytes = 0
        self.url_parts: list[bytes] = []
        self.url_len = 0
        self.nfields = 0
        self.error: HTTPError | None = None    # parsing stopped; raise once the queue is served
        self.eof = False
        self.done = False                      # no more requests will be parsed
        # Bytes fed since a message boundary, while the head that began there
        # is incomplete: the request line to relax if llhttp refuses it (_relax).
        self.head_chunks: list[bytes] | None = None
        self.heads_begun = 0
        self.pending_line: bytes | None = None
        self.relaxed: tuple[str, bytes] | None = None
        # Seldom read, but set here rather than as class defaults: in the compiled
        # build (request.pxd) every attribute is a declared field.
        self.on_wait = None                    # called about every READ_TICK while a read blocks
        self.refusal: HTTPError | None = None  # raised by our own callback checks
        self.poller: select.poll | None = None
        self.keep_method = False               # relax.RelaxedLine: the method was valid, only the target is relaxed

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()
        self.in_head = True
        self.url_parts = []
        self.url_len = 0
        self.nfields = 0
        self.heads_begun += 1

    def on_url(self, part: bytes) -> None:
        # Called per fragment, so an endless URL is cut off as it arrives.
        self.url_parts.append(part)
        self.url_len += len(part)
        if self.limit_line and self.url_len > self.limit_line:
            self._refuse(URITooLong("request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nfields += 1
        if self.limit_fields and self.nfields > self.limit_fields:
            self._refuse(HeadersTooLarge("too many header fields"))
        if self.limit_field_size and len(name) + len(value) + FIELD_FRAMING > self.limit_field_size:
            self._refuse(HeadersTooLarge("header field too large"))
        key = _HEADER_KEYS.get(name, False)  # inlined cache hit: once per header
        if key is False:
            key = header_key(name)
        if not self.in_head:
            self._check_trailer(key)
            return  # never merged into the environ (RFC 9110 §6.5.2)
        if key is None:
            return
        req = self.current
        fields = req.fields
        text = value.decode("latin-1")
        if key in fields:
            if key == "HTTP_HOST":
                self._refuse(BadRequest("more than one Host header"))  # RFC 9112 §3.2
            fields[key] += "," + text
        else:
            fields[key] = text

    def on_headers_complete(self) -> None:
        req = self.current
        parser = self.parser
        if self.relaxed is not None:
            req.method, req.url = self.relaxed
            self.relaxed = None
        else:
            method = parser.get_method()
            req.method = _METHODS.get(method) or method.decode("latin-1")
            req.url = b"".join(self.url_parts) if len(self.url_parts) != 1 else self.url_parts[0]
        if self.limit_line and (len(req.method) + 1 + len(req.url) + VERSION_FRAMING
                                > self.limit_line):
            self._refuse(URITooLong("request line too long"))
        req.keep_alive = keep_alive = parser.should_keep_alive()
        fields = req.fields
        if keep_alive and "HTTP_CONNECTION" not in fields and "HTTP_PROXY_CONNECTION" not in fields:
            # llhttp keeps only 1.1 alive without a Connection (or Proxy-Connection)
            # field: 1.0, 0.9 and 2.0 need "keep-alive" in one. So the version is
            # known without formatting it.
            req.version = "HTTP/1.1"
        else:
            version = parser.get_http_version()
            req.version = _VERSIONS.get(version) or self._other_version(version)
        if (fields.get("HTTP_HOST") not in _GOOD_HOSTS or req.url[:1] != b"/"
                or req.method == "CONNECT"):  # else: a known Host, origin-form
            self._check_head(req)
        if "HTTP_TRANSFER_ENCODING" in fields:
            if req.version == "HTTP/1.0":
                # RFC 9112 §6.1: faulty framing (as gunicorn and nginx answer it).
                self._refuse(BadRequest("Transfer-Encoding in an HTTP/1.0 request"))
            # RFC 9112 §7.1.1 allows BWS before a chunk extension's ";" ("5 ;a"),
            # which strict llhttp refuses. Set here, not per connection: rare.
            parser.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
            fields.pop("CONTENT_LENGTH", None)  # llhttp already refuses CL + TE
        elif "CONTENT_LENGTH" in fields:
            req.content_length = int(fields["CONTENT_LENGTH"])  # llhttp validated it
        expect = fields.get("HTTP_EXPECT")
        req.expect_continue = (expect is not None and expect.lower() == "100-continue"
                               and req.version == "HTTP/1.1")
        self.in_head = False
        self.head_bytes = 0
        self.head_due = 0.0
        self.ready.append(req)

    def on_body(self, data: bytes) -> None:
        req = self.current
        if req.body is None:
            req.body = deque()
        req.body.append(data)
        req.received += len(data)

    def on_message_complete(self) -> None:
        self.current.complete = True

    # -- checks llhttp leaves to us (see validate.py) ---------------------------

    def _check_head(self, req: Request) -> None:
        """Target form and Host, when on_headers_complete could not pass them at a glance."""
        if req.url[:1] != b"/" or req.method == "CONNECT":
            check_target(req.method, req.url)
        fields = req.fields
        host = fields.get("HTTP_HOST")
        if host is not None:
            if host not in _GOOD_HOSTS:  # a client sends the same Host again and again
                check_host(host)
                if len(_GOOD_HOSTS) < _GOOD_HOSTS_MAX:
                    _GOOD_HOSTS.add(host)
        elif req.version == "HTTP/1.1":
            self._refuse(BadRequest("HTTP/1.1 request without Host"))  # RFC 9112 §3.2

    def _other_version(self, version: str) -> str:
        # llhttp lets 0.9 and 2.0 through (later 1.x and 3+ come relaxed or refused).
        self._refuse(VersionNotSupported(f"HTTP/{version} on an HTTP/1 connection"))

    def _check_trailer(self, key: str | None) -> None:
        if self.current.version == "HTTP/1.0":
            self._refuse(BadRequest("trailer fields in an HTTP/1.0 request"))
        if key in FORBIDDEN_TRAILERS:
            self._refuse(BadRequest(f"{key} is not allowed as a trailer field"))

    def _refuse(self, exc: HTTPError) -> None:
        # httptools wraps callback exceptions; keep ours to answer with.
        self.refusal = exc
        raise exc

    # -- reading ------------------------------------------------------------

    def next_request(self, idle_timeout: float = 0.0, should_continue=None) -> Request | None:
        """The next request head, or None when the connection is finished.

        Raises HTTPError for a request that must be refused (RequestTimeout when
        the head takes longer than header_timeout). With idle_timeout, waits
        that long for a new request to start, checking should_continue()."""
        ready = self.ready
        while not ready:
            if self.error is not None:
                raise self.error
            if self.eof or self.done:
                return None
            if idle_timeout and not self.in_head:
                if not self._wait_idle(idle_timeout, should_continue):
                    return None
                idle_timeout = 0.0
            if not self.head_due and self.header_timeout:
                self.head_due = _monotonic() + self.header_timeout
            if not self.fill(head=True):
                return None
            if not ready and self.head_late():  # a trickle never times out a recv
                raise RequestTimeout("request head not complete within header_timeout")
        return ready.popleft()

    def fill(self, head: bool = False) -> bool:
        """One recv fed to the parser; False on EOF, timeout, reset or after a parse stop."""
        if self.done:
            return False
        if self.sock_timeout is None:
            try:  # the usual case: a whole head or body chunk is already there
                data = self.sock.recv(RECV_SIZE, _DONTWAIT)
            except BlockingIOError:
                data = self._recv(head, timed_out=False)
            except OSError:
                data = b""
        elif self.sock_timeout == self.tick and not (head and self.in_head):
            try:  # the usual case: a whole head or body chunk is already there
                data = self.sock.recv(RECV_SIZE)
            except TimeoutError:
                data = self._recv(head, timed_out=True)
            except OSError:
                data = b""
        else:
            data = self._recv(head, timed_out=False)
        return self._take(data)

    def read_now(self) -> bool:
        """One read that never waits (blocking sockets only): True when bytes (or
        the end of the connection) came, so next_request() will not wait."""
        if self.sock_timeout is not None or self.done:
            return False
        try:
            data = self.sock.recv(RECV_SIZE, _DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        self._take(data)
        return True

    def _take(self, data: bytes) -> bool:
        """Feed what one recv gave to the parser; False at EOF."""
        if not data:
            self.eof = True
            return False
        if self.pending_line is not None:
            self._relax_pending(data)
        else:
            # Keep the bytes of a head that starts at this recv, in case its
            # request line must be relaxed (see _relax).
            if self.in_head:
                if self.head_chunks is not None:
                    self.head_chunks.append(data)
            elif self.current is None or self.current.complete:
                self.head_chunks = [data]
                self.heads_begun = 0
            try:
                self.parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
                self._parse_stopped(exc)
        if self.in_head and not self.done:
            self.head_bytes += len(data)
            if self.head_bytes > self.max_head:
                self._stop(HeadersTooLarge("request head too large"))
        return True

    def _recv(self, head: bool, timed_out: bool) -> bytes:
        """Wait for one recv; b"" on EOF, reset or read_timeout. A wait lasts at
        most READ_TICK, so a silent client wakes us to call on_wait (the
        heartbeat) and to end a late head (RequestTimeout)."""
        waited, last = 0.0, self.sock_timeout
        while True:
            if timed_out:
                if self.on_wait is not None:
                    self.on_wait()
                waited += last
                if waited >= self.read_timeout:
                    return b""
            timeout = self.tick
            remaining = self.head_due - _monotonic() if head and self.head_due else None
            if remaining is not None and remaining < timeout:
                if remaining <= 0:
                    raise RequestTimeout("request head not complete within header_timeout")
                timeout = remaining  # wake right at the deadline
            last = timeout
            if self.sock_timeout is None:  # a blocking socket stays so: poll, then recv
                timed_out = not self._readable(timeout)
                if timed_out:
                    continue
                try:
                    return self.sock.recv(RECV_SIZE, _DONTWAIT)
                except BlockingIOError:
                    continue  # readable, then not (another reader cannot be: rare)
                except OSError:
                    return b""
            if self.sock_timeout != timeout:
                self.set_timeout(timeout)
            try:
                return self.sock.recv(RECV_SIZE)
            except TimeoutError:
                timed_out = True
            except OSError:
                return b""

    def _readable(self, timeout: float) -> bool:
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.sock.fileno(), select.POLLIN)
        return bool(self.poller.poll(timeout * 1000))

    def head_late(self, now: float | None = None) -> bool:
        """Whether a head is being read past header_timeout. For workers that
        wait for heads in their own poller (gthread): answer 408 and close."""
        return bool(self.head_due) and (_monotonic() if now is None else now) >= self.head_due

    def set_timeout(self, timeout: float) -> None:
        self.sock_timeout = timeout
        self.sock.settimeout(timeout)

    def for_sending(self) -> None:
        """Before a response: sendall() counts its timeout over the whole send, so
        the short read tick would cut off a slow reader (and a blocking socket
        would wait for it without end)."""
        if self.sock_timeout != self.read_timeout:
            self.set_timeout(self.read_timeout)

    def _wait_idle(self, timeout: float, should_continue) -> bool:
        """Wait for the next request to start; False if idle too long or asked to stop."""
        deadline = _monotonic() + timeout
        while True:
            if should_continue is not None and not should_continue():
                return False
            remaining = deadline - _monotonic()
            if remaining <= 0:
                return False
            if self._readable(min(remaining, IDLE_POLL_INTERVAL)):
                return True
