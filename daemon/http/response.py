"""One WSGI response: start_response, the head, the body's framing, and writing
it to the socket (coalesced with the head when small)."""

from __future__ import annotations

import io
import os
import socket
import stat
import time
from email.utils import formatdate

from .body import Input
from .errors import AppError, ClientDisconnected
from .request import Request
from .validate import HOP_BY_HOP, check_field_name, check_field_value

DRAIN_LIMIT = 64 * 1024      # unread body above this closes instead of draining
COALESCE_LIMIT = 64 * 1024   # head + first chunk in one sendall up to this size
SMALL_SEND = 8 * 1024        # a whole response this small never waits for the client
_DONTWAIT = socket.MSG_DONTWAIT
_time = time.time  # one global, not a module attribute per call


class FileWrapper:
    """wsgi.file_wrapper: iterates a file in blocks; sent with sendfile() when possible."""

    def __init__(self, filelike, blksize: int = 64 * 1024) -> None:
        self.filelike = filelike
        self.blksize = blksize
        if hasattr(filelike, "close"):
            self.close = filelike.close

    def __iter__(self):
        read, size = self.filelike.read, self.blksize
        while data := read(size):
            yield data



# -- cached bits of the hot path ---------------------------------------------

_NO_BODY = ("204", "304")    # and every 1xx
_STATUS_LINES: dict[str, tuple] = {}
# Response header name (as the app spells it) -> what it means to the server,
# once the name is checked as a token. Hop-by-hop names are refused, never cached.
_PLAIN, _LENGTH, _DATE, _SERVER = "plain", "content-length", "date", "server"
_MEANINGS = {_LENGTH: _LENGTH, _DATE: _DATE, _SERVER: _SERVER}  # lower-case name -> its kind
_KINDS: dict[str, str] = {}
_KINDS_MAX = 1024  # bounded: an app inventing names cannot grow it without end
# A response header the app sent before, (name, value) -> (its line in the head,
# its kind, its Content-Length or None), once checked: one lookup per header
# instead of checking, classifying and formatting it again. Bounded like _KINDS.
_HEADER_LINES: dict[tuple, tuple] = {}
_date = (0, "")


def _date_line() -> str:
    global _date
    now = int(_time())
    if _date[0] != now:  # a tuple swap, so threads never see half an update
        _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
    return _date[1]


def _header_kind(name) -> str:
    lname = check_field_name(name)
    if lname in HOP_BY_HOP:  # framing and persistence are the server's business
        raise AppError(f"hop-by-hop header {name!r} from the application (PEP 3333)")
    kind = _MEANINGS.get(lname, _PLAIN)
    if len(_KINDS) < _KINDS_MAX:
        _KINDS[name] = kind
    return kind


def _header_line(header) -> tuple:
    """(line, kind, Content-Length or None) of a header not seen before, checked."""
    try:
        name, value = header
    except (TypeError, ValueError):
        raise AppError(f"header {header!r} is not a (name, value) pair (PEP 3333)") from None
    kind = _KINDS.get(name) if type(name) is str else None
    if kind is None:
        kind = _header_kind(name)
    if type(value) is not str or not value.isprintable():  # isprintable: fast, then exact
        check_field_value(name, value)
    length = None
    if kind == _LENGTH:
        if not (value.isdigit() and value.isascii()):  # int() takes "+5", "1_0", " 7"
            raise AppError(f"Content-Length {value!r} is not an unsigned decimal")
        length = int(value)
    known = (f"{name}: {value}\r\n", kind, length)
    if type(header) is tuple and type(value) is str and len(_HEADER_LINES) < _KINDS_MAX:
        _HEADER_LINES[header] = known
    return known


def _length_of(chunks) -> int | None:
    """The body length of a list or tuple of bytes, else None (checked as sent)."""
    total = 0
    for chunk in chunks:
        if type(chunk) is not bytes:
            return None
        total += len(chunk)
    return total


def _status_line(status: str) -> tuple:
    """(the head's status line, whether no body follows: 1xx, 204, 304)."""
    known = _STATUS_LINES.get(status)
    if known is None:
        if type(status) is not str:
            raise AppError(f"status {status!r} is {type(status).__name__}, not str (PEP 3333)")
        if not (len(status) >= 4 and status[:3].isdigit() and status[3] == " "
                and status.isascii() and status.isprintable()):
            raise AppError(f"status {status!r} is not 'NNN Reason' (PEP 3333)")
        known = (f"HTTP/1.1 {status}\r\n", status[:3] in _NO_BODY or status[0] == "1")
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = known
    return known


# -- one request ----------------------------------------------------------------

class Response:
    """start_response, write() and the framing of one response."""

    __slots__ = ("sock", "req", "input", "keep_alive", "should_continue", "head_only", "status",
                 "headers", "headers_sent", "chunked", "content_length", "sent", "client_gone")

    def __init__(self, sock: socket.socket, req: Request, inp: Input, keep_alive: bool,
                 should_continue=None) -> None:
        self.sock = sock
        self.should_continue = should_continue  # a stop during the request still says close
        self.req = req
        self.input = inp
        self.keep_alive = keep_alive
        self.head_only = req.method == "HEAD"
        self.status: str | None = None
        self.headers: list = []
        self.headers_sent = False
        self.chunked = False
        self.content_length: int | None = None
        self.sent = 0                 # body bytes sent, framing excluded
        self.client_gone = False

    def start_response(self, status, headers, exc_info=None):
        if exc_info:
            try:
                if self.headers_sent:
                    raise exc_info[1].with_traceback(exc_info[2])
            finally:
                exc_info = None  # no traceback cycle
        elif self.status is not None:
            raise AssertionError("start_response() called twice without exc_info")
        self.status = status
        self.headers = headers
        return self.write

    def write(self, data: bytes) -> None:
        if self.status is None:
            raise AssertionError("write() before start_response()")
        if type(data) is not bytes:
            _check_bytes(data)
        if not data:
            return  # PEP 3333: the head waits for the first non-empty body bytes
        if not self.headers_sent:
            self.send_head(data, None)
        else:
            self.send_body(data)

    def _sendall(self, data) -> None:
        try:
            reader = self.input._reader
            if reader.sock_timeout is None:  # a blocking socket: send what fits now, never wait
                try:
                    sent = self.sock.send(data, _DONTWAIT)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    return
                data = memoryview(data)[sent:]
                reader.for_sending()  # the rest waits for the client, within read_timeout
            self.sock.sendall(data)
        except OSError as exc:
            self.client_gone = True
            raise ClientDisconnected("client gone while sending the response") from exc

    def send_head(self, first: bytes, known_length: int | None) -> None:
        """Send the head, and `first` body chunk with it when small."""
        if self.status is None:
            raise AssertionError("the application did not call start_response()")
        if self.keep_alive and self.should_continue is not None and not self.should_continue():
            self.keep_alive = False
        status_line, no_body = _status_line(self.status)
        parts = [status_line]
        has_date, has_server = self._scan_headers(parts)
        if not (no_body or self.head_only):  # else no body follows whatever the headers say
            self._choose_framing(parts, known_length)
        self._choose_persistence(parts)
        if not has_date:
            parts.append(_date_line())
        if not has_server:
            parts.append("Server: appd\r\n")
        parts.append("\r\n")
        try:
            head = "".join(parts).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise AppError(f"status or header is not latin-1 (PEP 3333): {exc}") from None
        self.headers_sent = True
        self._send_with_head(head, first, not (no_body or self.head_only))

    def _scan_headers(self, parts: list) -> tuple[bool, bool]:
        """Check the app's headers and add them to `parts`; note Content-Length,
        refuse hop-by-hop fields. Returns whether Date and Server were given."""
        has_date = has_server = False
        for header in self.headers:
            # Only a pair of str is looked up: anything else is unhashable or refused.
            if (type(header) is tuple and len(header) == 2 and type(header[0]) is str
                    and type(header[1]) is str):
                known = _HEADER_LINES.get(header)
                if known is None:
                    known = _header_line(header)
            else:
                known = _header_line(header)
            line, kind, length = known
            if kind != _PLAIN:
                if kind == _LENGTH:
                    if self.content_length is not None:
                        raise AppError("the application sent Content-Length twice")
                    self.content_length = length
                elif kind == _DATE:
                    has_date = True
                else:
                    has_server = True
            parts.append(line)
        return has_date, has_server

    def _choose_framing(self, parts: list, known_length: int | None) -> None:
        """Where the body ends: the app's Content-Length, one we know (a list
        body), chunked (HTTP/1.1 keep-alive), or else the connection's close."""
        if self.content_length is not None:
            return
        if known_length is not None:
            self.content_length = known_length
            parts.append(f"Content-Length: {known_length}\r\n")
        elif self.keep_alive and self.req.version == "HTTP/1.1":
            self.chunked = True
            parts.append("Transfer-Encoding: chunked\r\n")
        else:
            self.keep_alive = False  # the body ends where the connection does

    def _choose_persistence(self, parts: list) -> None:
        """Whether the connection carries another request, said in the head."""
        req, inp = self.req, self.input
        if self.keep_alive and not req.complete:
            # Decide now whether the unread body can be drained after the response.
            if inp.continue_pending or (req.content_length is not None
                                        and req.content_length - req.received > DRAIN_LIMIT):
                self.keep_alive = False
        inp.continue_pending = False  # too late for 100 Continue once a status is out
        if not self.keep_alive:
            parts.append("Connection: close\r\n")
        elif req.version == "HTTP/1.0":
            parts.append("Connection: keep-alive\r\n")

    def _send_with_head(self, head: bytes, first: bytes, body: bool) -> None:
        """The head, coalesced with the first body chunk up to COALESCE_LIMIT."""
        if self.content_length != len(first) or len(head) + len(first) > SMALL_SEND:
            # sendall() counts its timeout over the whole send: a slow reader
            # needs read_timeout, not the read tick. A small, whole response
            # fits the socket's send buffer and needs no wait at all.
            self.input._reader.for_sending()
        if not first or not body:
            self._sendall(head)
        elif len(first) <= COALESCE_LIMIT:
            self._sendall(head + self._frame(first))
        else:
            self._sendall(head)
            self._sendall(self._frame(first))

    def _frame(self, data: bytes) -> bytes:
        """Clip to Content-Length or wrap as a chunk; counts what is sent."""
        if self.content_length is not None:
            room = self.content_length - self.sent
            if len(data) > room:
                data = data[:room]
        self.sent += len(data)
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def send_body(self, data: bytes) -> None:
        if self.head_only or self.done():
            return
        self._sendall(self._frame(data))

    def done(self) -> bool:
        """True once Content-Length bytes have gone out: iterating further is waste."""
        return self.content_length is not None and self.sent >= self.content_length

    def send_result(self, result) -> None:
        if type(result) is FileWrapper and self._try_sendfile(result):
            return
        known = _length_of(result) if type(result) in (list, tuple) else None
        for chunk in result:
            if type(chunk) is not bytes:
                _check_bytes(chunk)
            if not chunk:
                continue
            if not self.headers_sent:
                self.send_head(chunk, known)
                if self.head_only:
                    break
            else:
                self.send_body(chunk)
            if self.done():
                break
        self.finish(known)

    def finish(self, known: int | None = None) -> None:
        if not self.headers_sent:
            self.send_head(b"", 0 if known is None else known)
        if self.chunked:
            self._sendall(b"0\r\n\r\n")
        elif (self.content_length is not None and self.sent < self.content_length
              and not self.head_only and self.status[:3] not in ("204", "304")):
            self.keep_alive = False  # short body: the client cannot find the next response

    def _try_sendfile(self, wrapper: FileWrapper) -> bool:
        """Send a regular file with sendfile(); False to fall back to iterating."""
        f = wrapper.filelike
        try:
            fd = f.fileno()
            if "b" not in getattr(f, "mode", "b") or not stat.S_ISREG(os.fstat(fd).st_mode):
                return False
            offset = f.tell()
            size = os.fstat(fd).st_size - offset
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            return False
        self.send_head(b"", max(size, 0))
        count = self.content_length
        if self.head_only or not count or self.status[:3] in ("204", "304"):
            return True
        if self.chunked:  # cannot happen with a known size; keep the contract anyway
            return False
        try:
            self.sent += self.sock.sendfile(f, offset, count)
        except OSError as exc:
            self.client_gone = True
            raise ClientDisconnected("client gone during sendfile") from exc
        if self.sent < count:
            self.keep_alive = False  # the file shrank under us
        return True


def _check_bytes(data) -> None:
    if not isinstance(data, bytes):
        raise AppError(f"the application's body holds a {type(data).__name__}, not bytes "
                       f"(PEP 3333): {data!r:.60}")

