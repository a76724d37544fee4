"""The asgi worker's HTTP layer under a real appd with a bare ASGI app:
backpressure, deadlines, connection limits, refusals, http.disconnect, and
a WebSocket upgrade without wsproto installed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time

import psutil
import pytest

from conftest import APPD, APPS, running_appd, wait_until

pytest.importorskip("wsproto")


@pytest.fixture(scope="module")
def raw_appd(tmp_path_factory):
    directory = tmp_path_factory.mktemp("raw")
    with running_appd(directory, "asgi_raw:app", "--worker-class", "asgi", "-w", "1",
                      "--worker-connections", "3", "--header-timeout", "1", "--keepalive", "2",
                      "--access-log", str(directory / "access.log"), "--log-format", "json",
                      env={"DISCONNECT_MARKER": str(directory / "disconnects")}) as appd:
        yield appd


def connect(appd) -> socket.socket:
    host, _, port = appd.address.rpartition(":")
    return socket.create_connection((host, int(port)), timeout=10)


def worker_rss(appd) -> int:
    return psutil.Process(appd.serving_generation()["workers"][0]["pid"]).memory_info().rss


def test_a_client_that_does_not_read_never_makes_the_worker_buffer(raw_appd):
    before = worker_rss(raw_appd)
    with connect(raw_appd) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(b"GET /infinite HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 200 OK")
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:  # the app would write GBs in this time unchecked
            time.sleep(0.1)
        grown = worker_rss(raw_appd) - before
    assert grown < 32 * 1024 * 1024, f"the worker grew by {grown} bytes for a client that reads nothing"
    assert raw_appd.get("/")[0] == 200


def test_access_log_line_per_request(raw_appd):
    assert raw_appd.get("/logged?x=1")[0] == 200
    log = raw_appd.tmp / "access.log"

    def logged():
        lines = [json.loads(line) for line in log.read_text().splitlines()]
        return [l for l in lines if l["path"] == "/logged?x=1"]
    entry = wait_until(logged, 10, message="the access log line")[0]
    assert entry["method"] == "GET" and entry["status"] == 200 and entry["bytes"] == len(b"raw v1 /logged")
    assert entry["generation"] == raw_appd.serving_generation()["id"]


def test_incomplete_request_head_is_answered_408(raw_appd):
    with connect(raw_appd) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = sock.recv(1000)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert time.monotonic() - started < 5


def test_malformed_and_oversized_requests_are_refused(raw_appd):
    for payload, status in ((b"GET / HTTP/1.1\r\nHost x\r\n\r\n", b"400"),
                            (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n", b"431"),
                            (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\n\r\n", b"414")):
        with connect(raw_appd) as sock:
            sock.sendall(payload)
            assert sock.recv(1000).startswith(b"HTTP/1.1 " + status), payload[:40]


def test_worker_connections_bounds_what_the_worker_accepts(raw_appd):
    held = [connect(raw_appd) for _ in range(3)]
    try:
        for sock in held:  # each one served once and kept alive: 3 connections held
            sock.sendall(b"GET /held HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"raw v1 /held" in sock.recv(1000)
        extra = connect(raw_appd)  # sits in the backlog: the worker holds 3
        extra.sendall(b"GET /extra HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        extra.settimeout(0.5)
        with pytest.raises(TimeoutError):
            extra.recv(1000)
        held.pop().close()  # one slot frees: the waiting connection is accepted and served
        extra.settimeout(10)
        assert b"raw v1 /extra" in extra.recv(1000)
        extra.close()
    finally:
        for sock in held:
            sock.close()


def test_app_hears_http_disconnect(raw_appd):
    marker = raw_appd.tmp / "disconnects"
    with connect(raw_appd) as sock:
        sock.sendall(b"GET /wait-disconnect HTTP/1.1\r\nHost: x\r\n\r\n")
        time.sleep(0.2)  # let the app start waiting (a shorter wait tests the same thing)
    wait_until(lambda: marker.exists() and "disconnect" in marker.read_text(), 10,
               message="the app to receive http.disconnect")


def test_websocket_upgrade_without_wsproto_is_refused_clearly(start_appd, tmp_path):
    hidden = tmp_path / "no_wsproto"
    (hidden / "wsproto").mkdir(parents=True)
    (hidden / "wsproto" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    appd = start_appd("asgi_raw:app", "--worker-class", "asgi", "-w", "1",
                      env={"PYTHONPATH": str(hidden)})
    with connect(appd) as sock:
        sock.sendall(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        answer = sock.recv(1000)
    assert answer.startswith(b"HTTP/1.1 501 ") and b"wsproto is not installed" in answer, answer
    wait_until(lambda: "websocket_unavailable" in appd.log(), 5, message="the error logged")
    assert appd.get("/")[0] == 200


def test_app_factory_and_a_clear_error_without_factory(start_appd):
    appd = start_appd("asgi_raw:create_app", "--worker-class", "asgi", "-w", "1", "--factory")
    assert appd.get("/x")[2] == b"raw v1 /x"
    wrong = start_appd("asgi_raw:create_app", "--worker-class", "asgi", "-w", "1", wait=False)
    wrong.proc.wait(30)
    assert wrong.proc.returncode != 0
    assert "is not an ASGI 3 application" in wrong.log() and "needs --factory" in wrong.log()


def test_appd_check_runs_the_asgi_lifespan_and_ready_check():
    def check(*args, env=None):
        return subprocess.run([APPD, "check", *args, "--worker-class", "asgi"], cwd=APPS, capture_output=True,
                              text=True, timeout=60, env={**os.environ, **(env or {})})
    ok = check("asgi_raw:create_app", "--factory", "--ready-check", "/healthz")
    assert ok.returncode == 0 and "/healthz answers 2xx" in ok.stdout, ok.stderr
    failed = check("asgi_fastapi:app", env={"FAIL_STARTUP": "1"})
    assert failed.returncode == 1 and "database unreachable (FAIL_STARTUP is set)" in failed.stderr, failed.stderr
