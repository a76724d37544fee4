"""Harness for appd.http tests over real sockets: a listener on 127.0.0.1:0,
one thread running handle_connection per accepted connection, raw sockets and
http.client as clients. Every app is wrapped in wsgiref.validate.validator
unless a test says why not."""

from __future__ import annotations

import http.client
import socket
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from wsgiref.validate import validator

import pytest

from appd.http import ServerInfo, handle_connection
from appd.http import wsgi as wsgi_mod

sys.path.insert(0, str(Path(__file__).parent / "apps"))
import wsgi_samples as samples  # noqa: E402

TIMEOUT = 10.0
APP = validator(samples.router)

# A test module of the HTTP layer sets `pytestmark = STRICT_WARNINGS`: a WSGI
# violation or an exception lost in a thread fails the test.
STRICT_WARNINGS = [
    pytest.mark.filterwarnings("error::wsgiref.validate.WSGIWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning"),
    pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning"),
]


@pytest.fixture(autouse=True)
def _short_timeouts(monkeypatch):
    # A stuck test fails in seconds instead of waiting for the 30 s production value.
    monkeypatch.setattr(wsgi_mod, "READ_TIMEOUT", 5.0)


class AccessLog:
    """Records what the request layer reports, as (remote, method, uri, version, status, bytes, s)."""

    def __init__(self):
        self.lines = []

    def before(self, req, environ):
        pass

    def write(self, environ, req, resp, duration):
        self.lines.append((environ.get("REMOTE_ADDR", ""), req.method, environ["RAW_URI"], req.version,
                           resp.status or "499 Client Closed Request", resp.sent, duration))

    def write_error(self, conn_env, status):
        self.lines.append((conn_env["REMOTE_ADDR"], "-", "-", "-", status, 0, 0.0))


class Server:
    """A listener plus one handle_connection thread per accepted connection."""

    def __init__(self, app, keepalive=0.0, info=None, should_continue=None, access_log=None):
        self.app, self.keepalive, self.access_log = app, keepalive, access_log
        self.should_continue = should_continue or (lambda: True)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.port = self.listener.getsockname()[1]
        self.info = info or ServerInfo("127.0.0.1", str(self.port))
        self.served, self.errors, self.threads, self.requests = [], [], [], 0
        self.stopping = threading.Event()
        self.acceptor = threading.Thread(target=self._accept_loop)
        self.acceptor.start()

    def _accept_loop(self):
        while not self.stopping.is_set():
            try:
                conn, addr = self.listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(None)  # handle_connection gets a blocking socket
            thread = threading.Thread(target=self._handle, args=(conn, addr))
            thread.start()
            self.threads.append(thread)

    def _count(self):
        self.requests += 1

    def _handle(self, conn, addr):
        try:
            self.served.append(handle_connection(
                conn, addr, self.app, self.info, self.access_log, self.keepalive,
                self.should_continue, self._count))
        except BaseException as exc:  # the contract: nothing escapes
            self.errors.append(exc)

    def close(self):
        self.stopping.set()
        self.acceptor.join(TIMEOUT)
        self.listener.close()
        for thread in self.threads:
            thread.join(TIMEOUT)
        assert not any(t.is_alive() for t in self.threads), "handler thread left running"
        assert not self.errors, self.errors

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=TIMEOUT)

    def http(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=TIMEOUT)


@contextmanager
def serving(app=APP, **kw):
    server = Server(app, **kw)
    try:
        yield server
    finally:
        server.close()


def read_until_close(sock: socket.socket, reset_ok: bool = False) -> bytes:
    """All bytes until the peer closes; with reset_ok a reset ends the reading too
    (a server that closes with unread input left sends RST after its answer)."""
    chunks = []
    try:
        while data := sock.recv(65536):
            chunks.append(data)
    except ConnectionResetError:
        if not reset_ok:
            raise
    return b"".join(chunks)


def read_response(f) -> tuple[int, dict, bytes]:
    """One response off a buffered socket file (Content-Length, chunked or close)."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    status = int(status_line.split()[1])
    headers = {}
    while (line := f.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = f.read(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int(f.readline().split(b";")[0], 16):
            body += f.read(size)
            f.readline()
        f.readline()
    elif status in (100, 204, 304):
        body = b""
    else:
        body = f.read()
    return status, headers, body


def raw(server, payload: bytes) -> bytes:
    with server.connect() as sock:
        sock.sendall(payload)
        return read_until_close(sock)
