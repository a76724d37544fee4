"""PEP 3333 glue: a connection served request by request, each request's
environ, the app called, errors answered (the response itself: response.py)."""

from __future__ import annotations

import socket
import sys
import time
from dataclasses import dataclass

import structlog

from .body import Input
from .errors import AppError, ClientDisconnected, HTTPError, RequestTimeout, error_response
from .names import split_target
from .request import Request, RequestReader
from .response import DRAIN_LIMIT, FileWrapper, Response, _date_line

__all__ = ["Connection", "FileWrapper", "ServerInfo", "handle_connection", "_date_line"]

READ_TIMEOUT = 30.0          # a client this slow to send a request is dropped
LINGER_TIMEOUT = 1.0         # after an error, read what the client still sends...
LINGER_BYTES = 256 * 1024    # ...so closing does not RST away our error response

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



# id(ServerInfo) -> (that ServerInfo, its environ template): looked up per
# connection, so by identity (hashing the frozen dataclass costs more).
_TEMPLATES: dict[int, tuple] = {}


def _base_environ(info: ServerInfo) -> dict:
    hit = _TEMPLATES.get(id(info))
    if hit is not None and hit[0] is info:
        return hit[1]
    env = _environ_template(info)
    if len(_TEMPLATES) < 64:
        _TEMPLATES[id(info)] = (info, env)
    return env


def _environ_template(info: ServerInfo) -> dict:
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
    rules = conn_env.get("appd.proxy")  # a trusted proxy's word on client, scheme, prefix
    if rules is not None and not rules.watched.isdisjoint(req.fields):
        rules.apply(environ)
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
        setup = info.setup
        self.reader = RequestReader(sock, info.limit_request_line, info.limit_request_fields,
                                    info.limit_request_field_size, info.header_timeout, READ_TIMEOUT,
                                    nonblocking_first=setup is None or not setup.blocking)
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
                    return True  # no whole head here: wait in the caller's poller, not in a thread
                try:
                    req = reader.next_request(idle, should_continue)
                except HTTPError as exc:
                    self.refuse(exc, access_log)
                    return False
                if req is None:
                    break
                keep = keepalive > 0 and req.keep_alive  # should_continue: asked as the head goes
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
        # The parser calls back into the reader: a cycle, left for the garbage
        # collector (a pass every few hundred connections) unless broken here.
        self.reader.parser = None


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
