"""appd.http, the request side: parsing, environ, bodies, limits, errors, fuzzing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
import threading
import time
import warnings
from wsgiref.validate import validator

import pytest
import structlog
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from appd.http import ServerInfo, handle_connection
from appd.http import wsgi as wsgi_mod

from http_harness import _short_timeouts  # noqa: F401  (an autouse fixture)
from http_harness import (APP, STRICT_WARNINGS, TIMEOUT, AccessLog, Server, raw, read_response, read_until_close,
                          samples, serving)

pytestmark = STRICT_WARNINGS


# -- basics ---------------------------------------------------------------------

def test_get_http11_with_http_client():
    log = AccessLog()
    with serving(access_log=log) as server:
        conn = server.http()
        conn.request("GET", "/hello")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"Hello, world!\n"
        assert resp.getheader("Connection") == "close"   # keepalive == 0
        assert resp.getheader("Server") == "appd" and resp.getheader("Date")
        conn.close()
    assert server.served == [1] and server.requests == 1
    (remote, method, path, version, status, length, duration), = log.lines
    assert (remote, method, path, version, status, length) == (
        "127.0.0.1", "GET", "/hello", "HTTP/1.1", "200 OK", 14)
    assert 0 <= duration < TIMEOUT


def test_content_length_added_for_a_single_bytes_list():
    # Unvalidated on purpose: validator's IteratorWrapper hides the list.
    with serving(samples.hello_unsized, keepalive=5.0) as server:
        conn = server.http()
        for _ in range(2):
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.getheader("Content-Length") == "14"
            assert resp.getheader("Transfer-Encoding") is None
            assert resp.read() == b"Hello, world!\n"
        conn.close()


def test_http10_request():
    with serving() as server:
        data = raw(server, b"GET /hello HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Connection: close" in head
    assert body == b"Hello, world!\n"


@pytest.mark.parametrize("version, connection, protocol", [
    (b"1.1", b"", "HTTP/1.1"),  # known from llhttp's keep-alive alone (no Connection field)
    (b"1.1", b"Connection: close\r\n", "HTTP/1.1"),
    (b"1.0", b"", "HTTP/1.0"),
    (b"1.0", b"Connection: keep-alive\r\n", "HTTP/1.0"),  # alive, yet not 1.1
    (b"1.0", b"Proxy-Connection: keep-alive\r\n", "HTTP/1.0"),  # llhttp reads it as Connection
])
def test_server_protocol_is_the_request_version(version, connection, protocol):
    with serving() as server:
        data = raw(server, b"GET /env HTTP/" + version + b"\r\nHost: x\r\n" + connection + b"\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    assert json.loads(body)["SERVER_PROTOCOL"] == protocol


@pytest.mark.parametrize("line, extra, status", [
    (b"GET /env HTTP/2.0", b"", b"505"),
    (b"GET /env HTTP/0.9", b"", b"505"),
    (b"POST /env HTTP/1.0", b"Transfer-Encoding: chunked\r\n", b"400"),  # RFC 9112 §6.1
])
def test_keep_alive_by_proxy_connection_does_not_make_a_request_http11(line, extra, status):
    with serving() as server:
        data = raw(server, line + b"\r\nHost: x\r\nProxy-Connection: keep-alive\r\n" + extra + b"\r\n")
    assert data.startswith(b"HTTP/1.1 " + status), data[:80]


def test_environ_contents():
    with serving() as server:
        conn = server.http()
        conn.request("POST", "/env/a%20b/%C3%A9?x=1&y=%20", body=b"hi",
                      headers={"X-Dup": "a", "Content-Type": "text/x-test", "X_Sneaky": "1"})
        resp = conn.getresponse()
        env = json.loads(resp.read())
        conn.close()
    assert env["REQUEST_METHOD"] == "POST"
    assert env["SCRIPT_NAME"] == ""
    assert env["PATH_INFO"] == "/env/a b/\u00c3\u00a9"  # latin-1 of the UTF-8 bytes
    assert env["QUERY_STRING"] == "x=1&y=%20"
    assert env["RAW_URI"] == "/env/a%20b/%C3%A9?x=1&y=%20"
    assert env["CONTENT_TYPE"] == "text/x-test" and env["CONTENT_LENGTH"] == "2"
    assert "HTTP_CONTENT_TYPE" not in env and "HTTP_X_SNEAKY" not in env
    assert env["SERVER_NAME"] == "127.0.0.1" and env["SERVER_PORT"] == str(server.port)
    assert env["SERVER_PROTOCOL"] == "HTTP/1.1" and env["HTTP_X_DUP"] == "a"
    assert env["REMOTE_ADDR"] == "127.0.0.1" and env["REMOTE_PORT"].isdigit()
    assert env["wsgi.version"] == [1, 0] and env["wsgi.url_scheme"] == "http"
    assert env["wsgi.multiprocess"] is True and env["wsgi.multithread"] is False
    assert env["wsgi.run_once"] is False and env["wsgi.input_terminated"] is True
    assert env["has_file_wrapper"]  # (wsgi.errors is the validator's wrapper here)
    assert wsgi_mod._base_environ(server.info)["wsgi.errors"] is sys.stderr


def test_duplicate_headers_are_joined():
    with serving() as server:
        data = raw(server, b"GET /env HTTP/1.1\r\nHost: x\r\nX-Dup: a\r\nx-dup: b\r\n\r\n")
    env = json.loads(data.partition(b"\r\n\r\n")[2])
    assert env["HTTP_X_DUP"] == "a,b" and env["HTTP_HOST"] == "x"


@pytest.mark.parametrize("target, path, query", [
    (b"http://example.com/env/p%20q?x=1", "/env/p q", "x=1"),  # absolute-form (proxies)
    (b"/env?b#frag", "/env", "b"),
    (b"*", "", ""),
])
def test_request_target_forms(target, path, query):
    with serving() as server:
        data = raw(server, b"OPTIONS " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    status, _, body = data.partition(b"\r\n\r\n")
    env = json.loads(body) if path else None
    if env is None:  # "*" routes nowhere: PATH_INFO "" -> the hello route
        assert status.startswith(b"HTTP/1.1 200") and body == b"Hello, world!\n"
    else:
        assert (env["PATH_INFO"], env["QUERY_STRING"]) == (path, query)


def test_unix_peer_has_empty_remote_addr():
    server_side, client = socket.socketpair()
    result = []
    info = ServerInfo("/run/appd.sock", "")
    thread = threading.Thread(target=lambda: result.append(
        handle_connection(server_side, "", APP, info)))
    thread.start()
    with client:
        client.settimeout(TIMEOUT)
        client.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
        env = json.loads(read_until_close(client).partition(b"\r\n\r\n")[2])
    thread.join(TIMEOUT)
    assert result == [1] and env["REMOTE_ADDR"] == "" and env["SERVER_PORT"] == ""


def test_a_served_connection_leaves_no_cycle_for_the_garbage_collector():
    """Freed by reference counting when it closes (the parser calls back into the
    reader: a cycle unless closing breaks it), so a busy worker runs no collections
    for its connections."""
    import gc
    info = ServerInfo("127.0.0.1", "8000")
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        for _ in range(20):
            server_side, client = socket.socketpair()
            with client:
                client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert handle_connection(server_side, ("127.0.0.1", 5000), APP, info) == 1
                assert read_until_close(client).startswith(b"HTTP/1.1 200")
        gc.collect()
        left = sorted({type(o).__name__ for o in gc.garbage if type(o).__module__.startswith("appd")})
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert left == []


# -- request bodies -------------------------------------------------------------

def test_post_with_content_length():
    body = os.urandom(300_000)
    with serving() as server:
        conn = server.http()
        conn.request("POST", "/echo", body=body)
        info = json.loads(conn.getresponse().read())
        conn.close()
    assert info == {"method": "POST", "length": len(body),
                    "sha256": hashlib.sha256(body).hexdigest()}


def test_chunked_request_body_sent_in_pieces():
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"5\r\nhello\r\n", b"6\r\n wor", b"ld\r\n", b"0\r\n\r\n"):
            sock.sendall(piece)
        status, _, body = read_response(sock.makefile("rb"))
    assert status == 200
    assert json.loads(body)["sha256"] == hashlib.sha256(b"hello world").hexdigest()


def test_readline_readlines_and_iteration():
    payload = b"first line\nsecond line\nthird\nfourth\nfifth"
    with serving() as server:
        conn = server.http()
        conn.request("POST", "/lines", body=payload)
        out = json.loads(conn.getresponse().read())
        conn.close()
    assert out == {"first": "first line\n", "partial": "sec", "second_rest": "ond line\n",
                   "some": ["third\n"], "rest": ["fourth\n", "fifth"]}


def test_expect_100_continue_sent_on_first_read():
    with serving() as server, server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        f = sock.makefile("rb")
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n" and f.readline() == b"\r\n"
        sock.sendall(b"abcde")
        status, _, body = read_response(f)
    assert status == 200 and json.loads(body)["length"] == 5


def test_expect_100_continue_not_sent_when_body_unread():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                     b"Expect: 100-continue\r\n\r\n")
        status, headers, body = read_response(sock.makefile("rb"))
        # The body may still come, so the connection cannot be reused.
        assert status == 200 and body == b"ignored\n" and headers["connection"] == "close"
        assert sock.recv(100) == b""


def test_unread_small_body_is_drained_for_keepalive():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123")
        f = sock.makefile("rb")
        status, headers, _ = read_response(f)
        assert status == 200 and "connection" not in headers
        sock.sendall(b"456789GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(f)[2] == b"Hello, world!\n"
        f.close()  # else the makefile keeps the fd open and the server idles on
    assert server.requests == 2


def test_unread_large_body_closes_instead_of_draining():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"POST /ignore HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n")
        status, headers, _ = read_response(sock.makefile("rb"))
        assert status == 200 and headers["connection"] == "close"


# -- limits and errors -----------------------------------------------------------

@pytest.mark.parametrize("payload, status", [
    (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(101)) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"v" * 9000 + b"\r\n\r\n", 431),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400),  # bad chunk
])
def test_refused_requests(payload, status):
    log = AccessLog()
    with serving(keepalive=5.0, access_log=log) as server:
        data = raw(server, payload)  # read to EOF: the server closed
        conn = server.http()  # and the next connection is served as usual
        conn.request("GET", "/hello")
        assert conn.getresponse().status == 200
        conn.close()
    assert data.startswith(b"HTTP/1.1 %d " % status) and b"Connection: close" in data
    assert log.lines[0][4].startswith(str(status))


def test_limits_can_be_disabled():
    info_kw = dict(limit_request_line=0, limit_request_fields=0, limit_request_field_size=0)
    with serving(info=ServerInfo("127.0.0.1", "0", **info_kw)) as server:
        data = raw(server, b"GET /hello?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n"
                   + b"".join(b"X-%d: v\r\n" % i for i in range(300)) + b"\r\n")
    assert data.startswith(b"HTTP/1.1 200 OK")


def test_app_exception_gives_500_and_is_logged():
    with serving() as server, structlog.testing.capture_logs() as logs:
        data = raw(server, b"GET /crash HTTP/1.1\r\nHost: x\r\n\r\n")
        conn = server.http()
        conn.request("GET", "/hello")
        assert conn.getresponse().read() == b"Hello, world!\n"
        conn.close()
    assert data.startswith(b"HTTP/1.1 500 Internal Server Error\r\n")
    assert data.endswith(b"\r\n\r\nInternal Server Error\n")
    assert [(e["event"], e["path"], e["exc_info"]) for e in logs] == [
        ("app_error", "/crash", True)]


def test_app_exception_after_response_started_closes():
    with serving(keepalive=5.0) as server, structlog.testing.capture_logs() as logs:
        data = raw(server, b"GET /crash_late HTTP/1.1\r\nHost: x\r\n\r\n")
        conn = server.http()
        conn.request("GET", "/hello")
        assert conn.getresponse().status == 200
        conn.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding: chunked" in head
    assert body == b"7\r\npartial\r\n"  # no terminating chunk: the client sees it broken
    assert logs and logs[0]["event"] == "app_error"


def test_client_reset_mid_response_is_quiet():
    with serving() as server, server.connect() as sock:
        sock.sendall(b"GET /stream/50000000 HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.recv(1000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    # Server.close() asserts the handler returned normally.


def test_slow_clients_time_out_quietly(monkeypatch):
    monkeypatch.setattr(wsgi_mod, "READ_TIMEOUT", 0.3)
    log = AccessLog()
    with serving(access_log=log) as server:
        for stalled in (b"GET /hello HTTP/1.1\r\nHost:",  # head never finished
                        b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n0123"):  # body
            with server.connect() as sock:
                sock.sendall(stalled)
                started = time.monotonic()
                assert read_until_close(sock) == b""  # dropped without an answer
                assert time.monotonic() - started < 3.0
    assert server.served == [0, 1]
    assert [line[4] for line in log.lines] == ["499 Client Closed Request"]


# -- fuzzing ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_server():
    server = Server(validator(samples.echo), keepalive=1.0)
    yield server
    server.close()


_token = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"BREW", b"", b"get"])
_line = st.binary(max_size=40).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))
_target = st.one_of(st.sampled_from([b"/", b"/a%20b?x=1", b"*", b"http://h/p", b"/%zz"]), _line)
_value = st.one_of(st.sampled_from([b"0", b"5", b"-1", b"99999999999999999999", b"chunked",
                                    b"100-continue", b"close", b"keep-alive"]), _line)
_header = st.tuples(st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding",
                                     b"Expect", b"Connection", b"X-A", b"X_B", b""]), _value)
_body = st.one_of(st.binary(max_size=64), st.sampled_from([b"hello", b"5\r\nhello\r\n0\r\n\r\n",
                                                           b"zz\r\n", b"3\r\nab"]))
_requestish = st.builds(
    lambda method, target, minor, headers, body: (
        method + b" " + target + b" HTTP/1." + minor + b"\r\n"
        + b"".join(n + b": " + v + b"\r\n" for n, v in headers) + b"\r\n" + body),
    _token, _target, st.sampled_from([b"0", b"1", b"9"]), st.lists(_header, max_size=6), _body)
STATUS_RE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")


@settings(max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=2048), _requestish,
                 st.lists(_requestish, min_size=2, max_size=3).map(b"".join)))
def test_fuzz_never_raises_and_answers_sanely(fuzz_server, payload):
    # Extension methods are served now; the validator only warns about them.
    # (The filter list is process-wide, so the server thread sees this too.)
    with warnings.catch_warnings(), fuzz_server.connect() as sock:
        warnings.filterwarnings("ignore", "Unknown REQUEST_METHOD")
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may already have refused and closed
        try:
            data = read_until_close(sock)  # EOF must come: the server closes
        except ConnectionResetError:
            data = b""
    if data:
        match = STATUS_RE.match(data)
        assert match, data[:200]
        event(f"status {match.group(1).decode()}")
        assert match.group(1) in (b"100", b"200", b"400", b"414", b"431", b"505"), data[:200]
    else:
        event("no answer")
    assert not fuzz_server.errors
