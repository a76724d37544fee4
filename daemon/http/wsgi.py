"""PEP 3333 glue: environ, start_response, response framing and writing."""

from __future__ import annotations

import functools
import io
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from email.utils import formatdate
import structlog

from .errors import AppError, ClientDisconnected, HTTPError, RequestTimeout, error_response
from .body import Input
from .request import Request, RequestReader, split_target
from .validate import HOP_BY_HOP, check_field_name, check_field_value

READ_TIMEOUT = 30.0          # a client this slow to send a request is dropped
DRAIN_LIMIT = 64 * 1024      # unread body above this closes instead of draining
LINGER_TIMEOUT = 1.0         # after an error, read what the client still sends...
LINGER_BYTES = 256 * 1024    # ...so closing does not RST away our error response
COALESCE_LIMIT = 64 * 1024   # head + first chunk in one sendall up to this size
SMALL_SEND = 8 * 1024        # a whole response this small never waits for the client

_log = structlog.get_logger()


@dataclass(frozen=True)
class ServerInfo:
    """What the environ needs from the listener; built once per worker."""

    server_name: str
    server_port: str
    url_scheme: str = "http"
    limit_request_line: int = 4094
    limit_request_fields: int = 100
    limit_request_field_size: int = 8190
    header_timeout: float = 10.0
    multithread: bool = False
    multiprocess: bool = True
    setup: object = None  # proxy.ConnectionSetup: PROXY header, TLS, forwarded headers


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

_STATUS_LINES: dict[str, str] = {}
_NAMES: dict[str, str] = {}   # response header names checked as tokens -> lower case
_date = (0, "")


def _date_line() -> str:
    global _date
    now = int(time.time())
    if _date[0] != now:  # a tuple swap, so threads never see half an update
        _date = (now, f"Date: {formatdate(now, usegmt=True)}\r\n")
    return _date[1]


def _status_line(status: str) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        if type(status) is not str:
            raise AppError(f"status {status!r} is {type(status).__name__}, not str (PEP 3333)")
        if not (len(status) >= 4 and status[:3].isdigit() and status[3] == " "
                and status.isascii() and status.isprintable()):
            raise AppError(f"status {status!r} is not 'NNN Reason' (PEP 3333)")
        line = f"HTTP/1.1 {status}\r\n"
        if len(_STATUS_LINES) < 256:
            _STATUS_LINES[status] = line
    return line


@functools.lru_cache(maxsize=16)
def _base_environ(info: ServerInfo) -> dict:
    return {
        "SCRIPT_NAME": "",
        "SERVER_NAME": info.server_name,
        "SERVER_PORT": info.server_port,
        "SERVER_SOFTWARE": "appd",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": info.url_scheme,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": info.multithread,
        "wsgi.multiprocess": info.multiprocess,
        "wsgi.run_once": False,
        "wsgi.file_wrapper": FileWrapper,
        "wsgi.input_terminated": True,
    }


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
            self.sock.sendall(data)
        except OSError as exc:
            self.client_gone = True
            raise ClientDisconnected("client gone while sending the response") from exc

    def send_head(self, first: bytes, known_length: int | None) -> None:
        """Send the head, and `first` body chunk with it when small."""
        status = self.status
        if status is None:
            raise AssertionError("the application did not call start_response()")
        if self.keep_alive and self.should_continue is not None and not self.should_continue():
            self.keep_alive = False
        code = status[:3]
        no_body = code[0] == "1" or code == "204" or code == "304"
        parts = [_status_line(status)]
        has_date = has_server = False
        for name, value in self.headers:
            lname = _NAMES.get(name) or check_field_name(name, _NAMES)
            if type(value) is not str or not value.isprintable():  # isprintable: fast, then exact
                check_field_value(name, value)
            if lname == "content-length":
                if self.content_length is not None:
                    raise AppError("the application sent Content-Length twice")
                if not (value.isdigit() and value.isascii()):  # int() takes "+5", "1_0", " 7"
                    raise AppError(f"Content-Length {value!r} is not an unsigned decimal")
                self.content_length = int(value)
            elif lname in HOP_BY_HOP:
                # Framing and persistence are the server's business.
                raise AppError(f"hop-by-hop header {name!r} from the application (PEP 3333)")
            elif lname == "date":
                has_date = True
            elif lname == "server":
                has_server = True
            parts.append(f"{name}: {value}\r\n")
        if no_body or self.head_only:
            pass  # no body follows whatever the headers say
        elif self.content_length is None:
            if known_length is not None:
                self.content_length = known_length
                parts.append(f"Content-Length: {known_length}\r\n")
            elif self.keep_alive and self.req.version == "HTTP/1.1":
                self.chunked = True
                parts.append("Transfer-Encoding: chunked\r\n")
            else:
                self.keep_alive = False  # the body ends where the connection does
        if self.keep_alive and not self.req.complete:
            # Decide now whether the unread body can be drained after the response.
            req, inp = self.req, self.input
            if inp.continue_pending or (req.content_length is not None
                                        and req.content_length - req.received > DRAIN_LIMIT):
                self.keep_alive = False
        inp = self.input
        inp.continue_pending = False  # too late for 100 Continue once a status is out
        if not self.keep_alive:
            parts.append("Connection: close\r\n")
        elif self.req.version == "HTTP/1.0":
            parts.append("Connection: keep-alive\r\n")
        if not has_date:
            parts.append(_date_line())
        if not has_server:
            parts.append("Server: appd\r\n")
        parts.append("\r\n")
        try:
            head = "".join(parts).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise AppError(f"status or header is not latin-1 (PEP 3333): {exc}") from None
        if self.content_length != len(first) or len(head) + len(first) > SMALL_SEND:
            # sendall() counts its timeout over the whole send: a slow reader
            # needs read_timeout, not the read tick. A small, whole response
            # fits the socket's send buffer and needs no wait at all.
            self.input._reader.for_sending()
        self.headers_sent = True
        if not first or no_body or self.head_only:
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
        known = None
        if type(result) in (list, tuple) and all(type(c) is bytes for c in result):
            known = sum(map(len, result))
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


def _serve(sock, reader: RequestReader, req: Request, app, conn_env: dict,
           keep_alive: bool, access_log, should_continue=None) -> bool:
    """Run the app for one request; True if the connection may carry another."""
    started = time.perf_counter() if access_log else 0.0
    environ = conn_env.copy()
    environ.update(req.fields)
    path, query = split_target(req.url)
    environ["REQUEST_METHOD"] = req.method
    environ["PATH_INFO"] = path
    environ["QUERY_STRING"] = query
    environ["RAW_URI"] = req.url.decode("latin-1")
    environ["SERVER_PROTOCOL"] = req.version
    environ["wsgi.input"] = inp = Input(reader, req)
    if "appd.proxy" in environ:  # a trusted proxy's word on client, scheme, prefix
        environ["appd.proxy"].apply(environ)
    if access_log:
        access_log.before(req, environ)
    resp = Response(sock, req, inp, keep_alive, should_continue if keep_alive else None)
    result = None
    try:
        result = app(environ, resp.start_response)
        resp.send_result(result)
    except Exception as exc:
        resp.keep_alive = False
        if resp.client_gone or isinstance(exc, ClientDisconnected):
            reader.eof = True  # nobody to answer: close quietly, no lingering
        elif isinstance(exc, HTTPError) and not resp.headers_sent:
            _send_error(resp, reader, exc.status)  # e.g. a malformed chunked body
        else:
            if isinstance(exc, AppError):  # the mistake named in one line; no traceback needed
                _log.error("app_error", path=path, error=str(exc))
            else:
                _log.error("app_error", exc_info=True, path=path)
            if not resp.headers_sent:  # else mid-body: closing is all we can do
                _send_error(resp, reader, "500 Internal Server Error")
    finally:
        if result is not None and hasattr(result, "close"):
            try:
                result.close()
            except Exception:
                _log.error("app_error", exc_info=True, path=path, during="close")
                resp.keep_alive = False
    if access_log:  # 499 (nginx's code) when the client left before any status was chosen
        access_log.write(environ, req, resp, time.perf_counter() - started)
    return resp.keep_alive and inp.drain(DRAIN_LIMIT)


def _send_error(resp: Response, reader: RequestReader, status: str) -> None:
    resp.status = status
    resp.headers_sent = True
    try:
        resp._sendall(error_response(status, _date_line()))
    except ClientDisconnected:
        reader.eof = True


def _linger_close(sock: socket.socket) -> None:
    """Half-close, then read what the client still sends before closing.

    Closing with unread input makes the kernel send RST, which can destroy
    the response before the client reads it (Apache's lingering close)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(LINGER_TIMEOUT)
        deadline = time.monotonic() + LINGER_TIMEOUT
        total = 0
        while total < LINGER_BYTES and time.monotonic() < deadline:
            data = sock.recv(65536)
            if not data:
                break
            total += len(data)
    except OSError:
        pass


def _always() -> bool:
    return True


class Connection:
    """One accepted connection and its parser state.

    handle_connection() serves it start to finish (sync worker). The gthread
    worker serves it in turns with park=True: between keep-alive requests the
    connection is handed back, so an idle client holds no thread."""

    def __init__(self, sock: socket.socket, client_addr, info: ServerInfo) -> None:
        self.sock = sock
        env = _base_environ(info).copy()
        if isinstance(client_addr, tuple):
            env["REMOTE_ADDR"] = str(client_addr[0])
            env["REMOTE_PORT"] = str(client_addr[1])
        else:  # unix socket peers are anonymous
            env["REMOTE_ADDR"] = client_addr if isinstance(client_addr, str) else ""
        self.env = env
        self.reader = RequestReader(sock, info.limit_request_line, info.limit_request_fields,
                                    info.limit_request_field_size, info.header_timeout, READ_TIMEOUT)
        self.served = 0
        self.setup = info.setup  # done on the first serve(), in the serving thread

    def serve(self, app, access_log=None, keepalive: float = 0.0, should_continue=_always,
              on_request=None, park: bool = False, on_wait=None) -> bool:
        """Serve requests. Returns True when the connection is idle between keep-alive
        requests and park=True: the caller waits until it is readable and calls
        serve() again. Returns False once the connection is closed. Client errors
        never raise out of here. on_wait is called about every READ_TICK while a
        read blocks (the sync worker's heartbeat)."""
        if self.setup is not None and not self.setup.prepare(self):
            return False
        reader, conn, conn_env = self.reader, self.sock, self.env
        reader.on_wait = on_wait
        linger = False
        idle = 0.0
        try:
            while True:
                if park and idle and not reader.ready:
                    return True  # no whole head buffered: wait in the caller's poller, not in a thread
                try:
                    req = reader.next_request(idle, should_continue)
                except HTTPError as exc:
                    self.refuse(exc, access_log)
                    return False
                if req is None:
                    break
                keep = keepalive > 0 and req.keep_alive and should_continue()
                try:
                    keep = _serve(conn, reader, req, app, conn_env, keep, access_log, should_continue)
                finally:
                    self.served += 1
                    if on_request is not None:
                        on_request()
                if not keep:
                    # Unread input left behind would turn our close into an RST.
                    linger = not reader.eof and (not req.complete or reader.done)
                    break
                idle = keepalive
        except OSError:  # ClientDisconnected, reset, broken pipe, timeouts
            linger = False
        self.close(linger)
        return False

    def head_late(self, now: float | None = None) -> bool:
        """A request head is being read past header_timeout (for workers that
        wait for heads in their own poller: then call refuse(RequestTimeout()))."""
        return self.reader.head_late(now)

    def refuse(self, exc: HTTPError, access_log=None) -> None:
        """Answer a request we refuse (400, 408, 414, 431, 505) and close."""
        try:
            self.reader.for_sending()
            self.sock.sendall(error_response(exc.status, _date_line()))
        except OSError:
            self.close()
            return
        if access_log:
            access_log.write_error(self.env, exc.status)
        # A late head has been read to its last byte: nothing unread to turn
        # the close into an RST, and lingering would hold the worker for a
        # client that is too slow already.
        self.close(linger=not isinstance(exc, RequestTimeout))

    def close(self, linger: bool = False) -> None:
        if linger:
            _linger_close(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


def handle_connection(conn: socket.socket, client_addr, app, info: ServerInfo,
                      access_log=None, keepalive: float = 0.0,
                      should_continue=_always, on_request=None, on_wait=None) -> int:
    """Serve requests on one accepted blocking connection; return how many were served.

    keepalive == 0: one request, then close. keepalive > 0: HTTP/1.1
    persistent connection, idle for at most `keepalive` seconds between
    requests, closed as soon as should_continue() is False."""
    connection = Connection(conn, client_addr, info)
    connection.serve(app, access_log, keepalive, should_continue, on_request, on_wait=on_wait)
    return connection.served
