"""appd.http's RFC 9110/9112 and PEP 3333 checks, in process: applications'
mistakes answered 500 with one log line naming them, the relaxed request line
(extension methods, raw UTF-8 targets) whatever the recv boundaries, trailers
never merged, limits counted as gunicorn counts them. The full raw-request
corpus runs against a real appd in test_conformance.py."""

from __future__ import annotations

import json
import socket
import time

import pytest
import structlog

from appd.http import ServerInfo
from http_harness import _short_timeouts  # noqa: F401  (an autouse fixture)
from http_harness import raw, read_until_close, samples, serving


def _app(status="200 OK", headers=(("Content-Type", "text/plain"),), body=(b"ok",)):
    def app(environ, start_response):
        start_response(status, list(headers))
        return list(body)
    return app


MISTAKES = [
    ("str body", _app(body=["text"]), "holds a str, not bytes"),
    ("Content-Length +5", _app(headers=[("Content-Length", "+5")]), "'+5' is not an unsigned decimal"),
    ("Content-Length 1_0", _app(headers=[("Content-Length", "1_0")]), "'1_0' is not an unsigned"),
    ("Content-Length -3", _app(headers=[("Content-Length", "-3")]), "'-3' is not an unsigned"),
    ("Content-Length twice", _app(headers=[("Content-Length", "2"), ("content-length", "2")]),
     "Content-Length twice"),
    ("Connection", _app(headers=[("Connection", "close")]), "hop-by-hop header 'Connection'"),
    ("Transfer-Encoding", _app(headers=[("Transfer-Encoding", "chunked")]), "hop-by-hop"),
    ("Keep-Alive", _app(headers=[("Keep-Alive", "timeout=5")]), "hop-by-hop"),
    ("CTL in a value", _app(headers=[("X-A", "a\x07b")]), "contains a control character"),
    ("line break in a value", _app(headers=[("X-A", "a\r\nSet-Cookie: x")]), "control character"),
    ("bytes value", _app(headers=[("X-A", b"v")]), "has a bytes value, not str"),
    ("bytes name", _app(headers=[(b"X-A", "v")]), "is bytes, not str"),
    ("name not a token", _app(headers=[("X A", "v")]), "is not a token"),
    ("header of three", _app(headers=[("X-A", "v", "w")]), "is not a (name, value) pair"),
    ("header a str", _app(headers=["X-A: v"]), "is not a (name, value) pair"),
    ("same Content-Length twice", _app(headers=[("Content-Length", "2")] * 2), "Content-Length twice"),
    ("bytes status", _app(status=b"200 OK"), "is bytes, not str"),
    ("status without reason", _app(status="200"), "is not 'NNN Reason'"),
    ("non-latin-1 value", _app(headers=[("X-A", "\u2713")]), "not latin-1"),
]


@pytest.mark.parametrize("label, app, named", MISTAKES, ids=[m[0] for m in MISTAKES])
def test_app_mistake_is_a_500_and_one_line_naming_it(label, app, named):
    with serving(app, keepalive=5.0) as server, structlog.testing.capture_logs() as logs:
        data = raw(server, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n"), data[:80]
    assert b"Connection: close" in data and data.endswith(b"Internal Server Error\n")
    (line,) = logs
    assert line["event"] == "app_error" and line["path"] == "/x" and "exc_info" not in line
    assert named in line["error"], line["error"]


def test_mistake_after_the_response_started_is_logged_and_closes():
    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/plain")])
        yield b"first"
        yield "second"
    with serving(app, keepalive=5.0) as server, structlog.testing.capture_logs() as logs:
        data = raw(server, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and b"Transfer-Encoding: chunked" in head
    assert body == b"5\r\nfirst\r\n"  # cut short: no last chunk, then the close
    (line,) = logs
    assert "holds a str" in line["error"]


def test_good_response_headers_pass_untouched():
    app = _app(headers=[("Content-Length", "2"), ("X-Tab", "a\tb"), ("X-Latin", "caf\xe9"),
                        ("!#$%&'*+-.^_`|~", "tchars")])
    with serving(app) as server:
        data = raw(server, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"X-Tab: a\tb\r\n" in data and b"X-Latin: caf\xe9\r\n" in data
    assert b"!#$%&'*+-.^_`|~: tchars\r\n" in data and data.endswith(b"\r\n\r\nok")


def send_in_pieces(server, pieces, pause=0.02) -> bytes:
    with server.connect() as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for piece in pieces:
            sock.sendall(piece)
            time.sleep(pause)  # a separate recv on the server side
        return read_until_close(sock)


@pytest.mark.parametrize("pieces", [
    [b"BREW /env/caf\xc3\xa9?q=\xe2\x9c\x93 HTTP/1.1\r\nHost: a\r\n\r\n"],
    [b"BR", b"EW /env/caf\xc3", b"\xa9?q=\xe2\x9c\x93 HTTP/1.1\r", b"\nHost: a\r\n\r\n"],
    [b"\r\nBREW /env/caf\xc3\xa9?q=\xe2\x9c\x93 HTTP/1.1\r\nHo", b"st: a\r\n\r\n"],
], ids=["whole", "split-in-the-line", "leading-crlf"])
def test_extension_method_and_utf8_target_whatever_the_recv_boundaries(pieces):
    with serving(samples.env) as server:
        data = send_in_pieces(server, pieces)
    assert data.startswith(b"HTTP/1.1 200 OK"), data[:100]
    env = json.loads(data.partition(b"\r\n\r\n")[2])
    assert env["REQUEST_METHOD"] == "BREW"
    assert env["RAW_URI"] == "/env/caf\xc3\xa9?q=\xe2\x9c\x93"  # latin-1 of the bytes sent
    assert env["PATH_INFO"] == "/env/caf\xc3\xa9" and env["QUERY_STRING"] == "q=\xe2\x9c\x93"


@pytest.mark.parametrize("line", [
    b"BR(W / HTTP/1.1",              # not a token
    b"BREW /a b HTTP/1.1",           # SP in the target
    b"BREW /\xc3\xa9\x01 HTTP/1.1",  # a CTL beside UTF-8
    b"BREW / HTTP/1.1 x",            # an extra word
])
def test_relaxed_line_still_refuses_what_the_rfc_refuses(line):
    with serving(samples.env) as server:
        data = raw(server, line + b"\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400 Bad Request")


def test_relaxed_line_longer_than_the_limit_is_414():
    with serving(samples.env) as server:
        data = send_in_pieces(server, [b"BREW /\xc3\xa9" + b"a" * 3000, b"a" * 3000])
    assert data.startswith(b"HTTP/1.1 414 ")


def test_trailers_are_never_merged_into_the_environ():
    body = b"5\r\nhello\r\n0\r\nX-Trailer: t\r\nX-Other: o\r\n\r\n"
    with serving(samples.env) as server:
        data = raw(server, b"POST /env HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body)
    env = json.loads(data.partition(b"\r\n\r\n")[2])
    assert "HTTP_X_TRAILER" not in env and "HTTP_X_OTHER" not in env and env["HTTP_HOST"] == "a"


@pytest.mark.parametrize("value_size, status", [(8185, 200), (8186, 431)])
def test_field_size_counts_name_colon_space_value_crlf(value_size, status):
    # "X: " + value + CRLF = 8190 bytes is the largest field under the default
    # limit_request_field_size, as gunicorn counts it.
    with serving(samples.hello) as server:
        data = raw(server, b"GET / HTTP/1.1\r\nHost: a\r\nX: " + b"v" * value_size + b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 %d " % status)


@pytest.mark.parametrize("path_size, status", [(4080, 200), (4081, 414)])
def test_request_line_counts_method_target_and_version(path_size, status):
    # "GET /" + path + " HTTP/1.1" = 4094 bytes is the longest line under the default.
    with serving(samples.hello) as server:
        data = raw(server, b"GET /" + b"a" * path_size + b" HTTP/1.1\r\nHost: a\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 %d " % status)


def test_head_deadline_answers_408_and_closes():
    with serving(samples.hello) as server:
        server.info = ServerInfo("127.0.0.1", str(server.port), header_timeout=0.3)
        with server.connect() as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost:")
            started = time.monotonic()
            data = read_until_close(sock)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"Connection: close" in data
    assert time.monotonic() - started >= 0.2
