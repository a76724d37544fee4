"""drain: in-flight requests finish, connections already waiting in the
accept backlog are served (not reset), progress is streamed, and the daemon
exits 0; the drain timeout bounds it all."""

from __future__ import annotations

import json
import socket
import subprocess
import textwrap
import threading
import time
from pathlib import Path

from conftest import APPDCTL, http_get, wait_until

SLOW_APP = textwrap.dedent("""\
    import os, time
    from urllib.parse import parse_qs

    MARKS = os.environ["SLOW_MARKS"]

    def app(environ, start_response):
        if environ["PATH_INFO"] == "/slow":
            # Tell the test this request is in a worker's hands, then take our time.
            open(os.path.join(MARKS, f"{os.getpid()}-{time.monotonic_ns()}"), "w").close()
            seconds = float(parse_qs(environ["QUERY_STRING"])["s"][0])
            time.sleep(seconds)
            body = f"slept {seconds}\\n".encode()
        else:
            body = f"hello from {os.getpid()}\\n".encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    """)


def start_slow_app(start_appd, tmp_path: Path, *args: str):
    (tmp_path / "slowapp.py").write_text(SLOW_APP)
    marks = tmp_path / "marks"
    marks.mkdir()
    appd = start_appd("--chdir", str(tmp_path), "slowapp:app", *args, env={"SLOW_MARKS": str(marks)})
    return appd, marks


def in_background(function, *args, **kwargs) -> dict:
    """Run function in a thread; the returned dict gets "result" or "error", and "thread"."""
    outcome: dict = {}

    def run():
        try:
            outcome["result"] = function(*args, **kwargs)
        except Exception as exc:
            outcome["error"] = exc

    outcome["thread"] = threading.Thread(target=run, daemon=True)
    outcome["thread"].start()
    return outcome


def drain(appd, *args: str) -> subprocess.Popen:
    return subprocess.Popen([APPDCTL, "--socket", appd.socket, "--json", "drain", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def events(stdout: str) -> list[str]:
    return [json.loads(line)["event"] for line in stdout.splitlines() if line.startswith('{"id"')]


def test_drain_finishes_in_flight_request_then_exits_0(start_appd, tmp_path):
    appd, marks = start_slow_app(start_appd, tmp_path, "-w", "2")
    appd.seen |= appd.descendants()
    slow = in_background(http_get, appd.address, "/slow?s=2", timeout=15)
    wait_until(lambda: any(marks.iterdir()), 5, message="the slow request to reach a worker")
    started = time.monotonic()
    draining = drain(appd)
    stdout, stderr = draining.communicate(timeout=30)
    waited = time.monotonic() - started
    assert draining.returncode == 0, (stdout, stderr)
    assert "draining" in events(stdout), stdout
    slow["thread"].join(10)
    assert "error" not in slow, slow.get("error")
    status, _, body = slow["result"]
    assert (status, body) == (200, b"slept 2.0\n")
    assert waited > 1.0, "drain should have waited for the request in flight"
    assert appd.proc.wait(10) == 0


def raw_request(address: str) -> socket.socket:
    """Connect and send a complete GET; the connection now waits in the accept backlog."""
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=15)
    sock.sendall(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    return sock


def read_response(sock: socket.socket) -> bytes:
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    finally:
        sock.close()
    return b"".join(chunks)


def test_drain_serves_connections_waiting_in_backlog(start_appd, tmp_path):
    """One worker, busy on a slow request: five more connections wait in the
    backlog when the drain starts; every one is answered, none is reset."""
    appd, marks = start_slow_app(start_appd, tmp_path, "-w", "1")
    appd.seen |= appd.descendants()
    address = appd.address
    slow = in_background(http_get, address, "/slow?s=2", timeout=15)
    wait_until(lambda: any(marks.iterdir()), 5, message="the slow request to reach the worker")
    waiting = [raw_request(address) for _ in range(5)]
    draining = drain(appd)
    responses = [read_response(sock) for sock in waiting]
    stdout, stderr = draining.communicate(timeout=30)
    assert draining.returncode == 0, (stdout, stderr)
    for response in responses:
        assert response.startswith(b"HTTP/1.1 200 "), response
        assert b"hello from" in response
    slow["thread"].join(10)
    assert slow.get("result", (None,))[0] == 200, slow
    assert appd.proc.wait(10) == 0


def test_drain_timeout_bounds_a_request_that_never_ends(start_appd, tmp_path):
    appd, marks = start_slow_app(start_appd, tmp_path, "-w", "1")
    appd.seen |= appd.descendants()
    in_background(http_get, appd.address, "/slow?s=60", timeout=30)
    wait_until(lambda: any(marks.iterdir()), 5, message="the slow request to reach the worker")
    started = time.monotonic()
    draining = drain(appd, "--timeout", "1")
    stdout, stderr = draining.communicate(timeout=30)
    assert draining.returncode == 0, (stdout, stderr)
    assert appd.proc.wait(10) == 0
    assert time.monotonic() - started < 8, "the drain timeout was not enforced"
