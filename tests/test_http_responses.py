"""appd.http, the response side: framing, streaming, file_wrapper, keep-alive, Flask."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from wsgiref.validate import validator

import pytest

from appd.http import FileWrapper
from http_harness import _short_timeouts  # noqa: F401  (an autouse fixture)
from http_harness import STRICT_WARNINGS, raw, read_response, samples, serving

pytestmark = STRICT_WARNINGS


# -- responses ------------------------------------------------------------------

def test_head_sends_headers_only():
    with serving() as server:
        data = raw(server, b"HEAD /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    head, sep, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK") and sep and body == b""


def test_write_callable():
    with serving(keepalive=5.0) as server:
        conn = server.http()
        conn.request("GET", "/write")
        resp = conn.getresponse()
        assert resp.getheader("Transfer-Encoding") == "chunked"
        assert resp.read() == b"one,two,three"
        conn.close()


def test_exc_info_replaces_unsent_status():
    with serving() as server:
        conn = server.http()
        conn.request("GET", "/exc_info")
        resp = conn.getresponse()
        assert (resp.status, resp.read()) == (503, b"sorry\n")
        conn.close()


def test_204_has_no_body_or_length():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"GET /nocontent HTTP/1.1\r\nHost: x\r\n\r\nGET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        f = sock.makefile("rb")
        status, headers, _ = read_response(f)
        assert status == 204 and "content-length" not in headers
        assert "transfer-encoding" not in headers
        assert read_response(f)[2] == b"Hello, world!\n"
        f.close()


@pytest.mark.parametrize("keepalive", [0.0, 5.0])
def test_20mb_streamed_response(keepalive):
    total = 20 * 1024 * 1024 + 123
    with serving(keepalive=keepalive) as server:
        conn = server.http()
        conn.request("GET", f"/stream/{total}")
        resp = conn.getresponse()
        expected = "chunked" if keepalive else None
        assert resp.getheader("Transfer-Encoding") == expected
        got = 0
        while chunk := resp.read(1 << 20):
            assert chunk.count(b"x") == len(chunk)
            got += len(chunk)
        conn.close()
    assert got == total


def test_100mb_stream_keeps_memory_flat():
    # Own process, so the peak RSS measured is this stream's alone.
    script = textwrap.dedent("""
        import resource, socket, sys, threading
        sys.path.insert(0, sys.argv[1])
        import wsgi_samples
        from appd.http import ServerInfo, handle_connection
        a, b = socket.socketpair()
        b.settimeout(30)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t = threading.Thread(target=handle_connection,
                             args=(a, "", wsgi_samples.router, ServerInfo("x", "")))
        t.start()
        b.sendall(b"GET /stream/104857600 HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        got = 0
        while data := b.recv(1 << 16):
            got += len(data)
        t.join(30)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(got, peak - base)
    """)
    out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent / "apps")],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    got, growth_kib = map(int, out.stdout.split())
    assert got > 100 * 1024 * 1024  # body plus the head
    assert growth_kib < 20 * 1024, f"RSS grew {growth_kib} KiB for a 100 MB stream"


# -- wsgi.file_wrapper ----------------------------------------------------------

@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    return path


@pytest.fixture
def sendfile_calls(monkeypatch):
    calls = []
    real = socket.socket.sendfile

    def spy(self, file, offset=0, count=None):
        calls.append((offset, count))
        return real(self, file, offset, count)
    monkeypatch.setattr(socket.socket, "sendfile", spy)
    return calls


def test_file_wrapper_uses_sendfile(data_file, sendfile_calls):
    # Not wrapped in validator: its IteratorWrapper hides the FileWrapper from
    # the server, exactly like any middleware would (PEP 3333 allows that).
    app = samples.make_file_app(str(data_file))
    with serving(app, keepalive=5.0) as server:
        conn = server.http()
        for _ in range(2):  # Content-Length from the file size keeps the connection
            conn.request("GET", "/")
            resp = conn.getresponse()
            assert resp.getheader("Content-Length") == str(data_file.stat().st_size)
            assert resp.read() == data_file.read_bytes()
        conn.close()
    assert sendfile_calls == [(0, data_file.stat().st_size)] * 2


def test_file_wrapper_honours_content_length(data_file, sendfile_calls):
    app = samples.make_file_app(str(data_file), content_length=1000)
    with serving(app) as server:
        data = raw(server, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert data.partition(b"\r\n\r\n")[2] == data_file.read_bytes()[:1000]
    assert sendfile_calls == [(0, 1000)]


def test_file_wrapper_validated_and_without_fileno(data_file):
    with serving(validator(samples.make_file_app(str(data_file)))) as server:
        conn = server.http()
        conn.request("GET", "/")
        assert conn.getresponse().read() == data_file.read_bytes()
        conn.close()
    with serving() as server:  # a BytesIO has no fileno: iterated in blocks
        conn = server.http()
        conn.request("GET", "/bytesio")
        assert conn.getresponse().read() == b"0123456789" * 10000
        conn.close()
    assert FileWrapper  # exported for workers that want it


# -- keep-alive ------------------------------------------------------------------

def test_two_requests_on_one_connection():
    with serving(keepalive=5.0) as server:
        conn = server.http()
        for path in ("/hello", "/echo"):
            conn.request("POST" if path == "/echo" else "GET", path, body=b"x" * 10)
            resp = conn.getresponse()
            assert resp.status == 200 and resp.getheader("Connection") is None
            resp.read()
        conn.close()
    assert server.served == [2]


def test_pipelined_requests_answered_in_order():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                     b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        f = sock.makefile("rb")
        first, second, third = (read_response(f) for _ in range(3))
        assert sock.recv(10) == b""
    assert json.loads(first[2])["length"] == 3
    assert second[2] == b"Hello, world!\n"
    assert third[1]["connection"] == "close" and json.loads(third[2])["PATH_INFO"] == "/env"


def test_http10_keepalive():
    with serving(keepalive=5.0) as server, server.connect() as sock:
        sock.sendall(b"GET /hello HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        f = sock.makefile("rb")
        status, headers, body = read_response(f)
        assert headers["connection"] == "keep-alive" and body == b"Hello, world!\n"
        sock.sendall(b"GET /stream/10 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = read_response(f)  # 1.0 cannot chunk: close-delimited
        assert headers["connection"] == "close" and body == b"x" * 10


def test_idle_keepalive_times_out():
    with serving(keepalive=0.3) as server, server.connect() as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(sock.makefile("rb"))
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert 0.2 < time.monotonic() - started < 3.0


def test_should_continue_false_closes_idle_connection_at_once():
    go_on = threading.Event()
    go_on.set()
    with serving(keepalive=30.0, should_continue=go_on.is_set) as server, \
            server.connect() as sock:
        sock.sendall(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        f = sock.makefile("rb")
        assert read_response(f)[1].get("connection") is None  # kept alive
        started = time.monotonic()
        go_on.clear()  # graceful shutdown begins while the connection is idle
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 2.0  # not the 30 s keep-alive


def test_should_continue_false_marks_response_close():
    with serving(keepalive=30.0, should_continue=lambda: False) as server:
        data = raw(server, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    assert b"Connection: close" in data and data.endswith(b"Hello, world!\n")


# -- a real framework ------------------------------------------------------------

def test_flask_get_and_json_post():
    flask_app = samples.make_flask_app()

    def unwrap_input(environ, start_response):
        # Werkzeug reads wsgi.input to EOF (allowed by wsgi.input_terminated);
        # the validator's input wrapper only allows read(size), so hand Flask ours.
        environ["wsgi.input"] = environ["wsgi.input"].input
        return flask_app(environ, start_response)

    with serving(validator(unwrap_input), keepalive=5.0) as server:
        conn = server.http()
        conn.request("GET", "/items/42?q=hi")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read()) == {"id": 42, "q": "hi"}
        body = json.dumps({"name": "x", "tags": ["a", "b"]})
        conn.request("POST", "/items", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.status == 201
        assert json.loads(resp.read()) == {"created": {"name": "x", "tags": ["a", "b"]}, "n": 2}
        conn.close()
