"""Incremental HTTP/1.x request parsing over a blocking socket (httptools).

The parser is push-based: every byte fed is parsed at once, including any
pipelined requests that arrived in the same recv. So the reader only reads
from the socket when it has to (the next request's head is needed, or the app
wants more body), which bounds memory to one recv beyond what is consumed,
and parsed requests queue up in order.
"""

from __future__ import annotations

import select
import socket
import time
from collections import deque
from urllib.parse import unquote_to_bytes

import httptools

from .errors import BadRequest, ClientDisconnected, HeadersTooLarge, HTTPError, URITooLong

RECV_SIZE = 64 * 1024
# Cap on a request head when some limit is 0 ("no limit"): still never unbounded.
MAX_HEAD_BYTES = 4 * 1024 * 1024
# While a keep-alive connection is idle, wake this often to check should_continue().
IDLE_POLL_INTERVAL = 0.1

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_VERSIONS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}
_METHODS = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}

# Header name (raw bytes, as sent) -> environ key, or None to drop the field.
# Bounded so a client inventing names cannot grow it without end.
_HEADER_KEYS: dict[bytes, str | None] = {}
_HEADER_KEYS_MAX = 1024


def header_key(name: bytes) -> str | None:
    """Environ key for a header name; None for names with '_', which would
    collide with their '-' twin (X_User vs X-User spoofing, as gunicorn)."""
    key = _HEADER_KEYS.get(name, False)
    if key is not False:
        return key
    text = name.decode("latin-1").upper()
    if "_" in text:
        key = None
    elif text in ("CONTENT-TYPE", "CONTENT-LENGTH"):
        key = text.replace("-", "_")
    else:
        key = "HTTP_" + text.replace("-", "_")
    if len(_HEADER_KEYS) < _HEADER_KEYS_MAX:
        _HEADER_KEYS[name] = key
    return key


def split_target(url: bytes) -> tuple[str, str]:
    """PATH_INFO (percent-decoded, latin-1) and QUERY_STRING of a request target."""
    if url[:1] == b"/":
        path, _, query = url.partition(b"?")
        if b"#" in query or b"#" in path:
            path, _, query = url.partition(b"#")[0].partition(b"?")
    elif url == b"*":
        return "", ""
    else:  # absolute-form (proxies) or authority-form (CONNECT)
        try:
            parsed = httptools.parse_url(url)
            path, query = parsed.path or b"/", parsed.query or b""
        except httptools.HttpParserInvalidURLError:
            return "", ""
    if b"%" in path:
        path = unquote_to_bytes(path)
    return path.decode("latin-1"), query.decode("latin-1")


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
        self.body: deque[bytes] = deque()  # received, not yet read by the app
        self.received = 0
        self.complete = False              # whole body received
        self.broken = False                # body ended by a parse error


class RequestReader:
    """Reads requests off one connection; also the httptools callback target."""

    def __init__(self, sock: socket.socket, limit_line: int, limit_fields: int,
                 limit_field_size: int) -> None:
        self.sock = sock
        self.parser = httptools.HttpRequestParser(self)
        self.limit_line = limit_line
        self.limit_fields = limit_fields
        self.limit_field_size = limit_field_size
        if limit_line and limit_fields and limit_field_size:
            self.max_head = limit_line + 4 + limit_fields * (limit_field_size + 2) + 2
        else:
            self.max_head = MAX_HEAD_BYTES
        self.ready: deque[Request] = deque()  # heads complete, not yet served
        self.current: Request | None = None    # the message being parsed
        self.in_head = False
        self.head_bytes = 0
        self.url_parts: list[bytes] = []
        self.url_len = 0
        self.nfields = 0
        self.limit_error: HTTPError | None = None
        self.error: HTTPError | None = None    # parsing stopped; raise once the queue is served
        self.eof = False
        self.done = False                      # no more requests will be parsed
        self.poller: select.poll | None = None

    # -- httptools callbacks ------------------------------------------------

    def on_message_begin(self) -> None:
        self.current = Request()
        self.in_head = True
        self.url_parts = []
        self.url_len = 0
        self.nfields = 0

    def on_url(self, part: bytes) -> None:
        # Called per fragment, so an endless URL is cut off as it arrives.
        self.url_parts.append(part)
        self.url_len += len(part)
        if self.limit_line and self.url_len > self.limit_line:
            self._limit(URITooLong("request line too long"))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.nfields += 1
        if self.limit_fields and self.nfields > self.limit_fields:
            self._limit(HeadersTooLarge("too many header fields"))
        if self.limit_field_size and len(name) + len(value) + 2 > self.limit_field_size:
            self._limit(HeadersTooLarge("header field too large"))
        key = _HEADER_KEYS.get(name, False)  # inlined cache hit: once per header
        if key is False:
            key = header_key(name)
        if key is None:
            return
        fields = self.current.fields
        text = value.decode("latin-1")
        if key in fields:
            fields[key] += "," + text
        else:
            fields[key] = text

    def on_headers_complete(self) -> None:
        req = self.current
        parser = self.parser
        method = parser.get_method()
        req.method = _METHODS.get(method) or method.decode("latin-1")
        req.url = b"".join(self.url_parts) if len(self.url_parts) != 1 else self.url_parts[0]
        if self.limit_line and len(method) + 1 + len(req.url) > self.limit_line:
            self._limit(URITooLong("request line too long"))
        version = parser.get_http_version()
        req.version = _VERSIONS.get(version) or "HTTP/" + version
        req.keep_alive = parser.should_keep_alive()
        fields = req.fields
        if "HTTP_TRANSFER_ENCODING" in fields:
            fields.pop("CONTENT_LENGTH", None)  # llhttp already refuses CL + TE
        elif "CONTENT_LENGTH" in fields:
            req.content_length = int(fields["CONTENT_LENGTH"])  # llhttp validated it
        expect = fields.get("HTTP_EXPECT")
        req.expect_continue = (expect is not None and expect.lower() == "100-continue"
                               and req.version == "HTTP/1.1")
        self.in_head = False
        self.head_bytes = 0
        self.ready.append(req)

    def on_body(self, data: bytes) -> None:
        req = self.current
        req.body.append(data)
        req.received += len(data)

    def on_message_complete(self) -> None:
        self.current.complete = True

    def _limit(self, exc: HTTPError) -> None:
        # httptools wraps callback exceptions; keep ours to answer with.
        self.limit_error = exc
        raise exc

    # -- reading ------------------------------------------------------------

    def next_request(self, idle_timeout: float = 0.0, should_continue=None) -> Request | None:
        """The next request head, or None when the connection is finished.

        Raises HTTPError for a request that must be refused. With idle_timeout,
        waits that long for a new request to start, checking should_continue()."""
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
            if not self.fill():
                return None
        return ready.popleft()

    def fill(self) -> bool:
        """One recv fed to the parser; False on EOF, timeout, reset or after a parse stop."""
        if self.done:
            return False
        try:
            data = self.sock.recv(RECV_SIZE)
        except OSError:  # includes socket.timeout
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Upgrade/CONNECT: WSGI cannot hand over the socket, so serve the
            # request as plain HTTP and parse nothing after it.
            self.done = True
            req = self.current
            if req is not None:
                req.keep_alive = False
                req.complete = True
        except httptools.HttpParserError as exc:
            self.done = True
            self.error = self.limit_error or BadRequest(str(exc))
            if self.current is not None and not self.in_head and not self.current.complete:
                self.current.broken = True
        else:
            if self.in_head:
                self.head_bytes += len(data)
                if self.head_bytes > self.max_head:
                    self.done = True
                    self.error = HeadersTooLarge("request head too large")
        return True

    def _wait_idle(self, timeout: float, should_continue) -> bool:
        """Wait for the next request to start; False if idle too long or asked to stop."""
        if self.poller is None:
            self.poller = select.poll()
            self.poller.register(self.sock.fileno(), select.POLLIN)
        deadline = time.monotonic() + timeout
        while True:
            if should_continue is not None and not should_continue():
                return False
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            if self.poller.poll(min(remaining, IDLE_POLL_INTERVAL) * 1000):
                return True


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
        body = req.body
        while not body:
            if req.complete:
                return b""
            if req.broken:
                raise BadRequest("malformed request body")
            if self.continue_pending:
                self.continue_pending = False
                try:
                    self._reader.sock.sendall(_CONTINUE)
                except OSError as exc:
                    raise ClientDisconnected("client gone before sending the body") from exc
            if self._reader.done and not req.broken:
                req.broken = True  # parsing stopped (upgrade) before this body ended
                continue
            if not self._reader.fill():
                raise ClientDisconnected("client closed the connection mid-body")
        return body.popleft()

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
            req.body.clear()
        return True
