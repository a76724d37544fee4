"""header_timeout on a real appd with sync workers: a client that sends half a
request head and goes quiet gets 408 and a close when the deadline passes;
while it is read, the worker's heartbeat goes on (so `--timeout` does not kill
it as hung), and requests queued behind such clients are served within the
bound the deadline sets."""

from __future__ import annotations

import socket
import time

from appd.http.request import READ_TICK
from conftest import wait_until
from http_harness import read_until_close
from helpers import address_of, worker_pids

HALF_HEAD = b"GET / HTTP/1.1\r\nHost: slow.example\r\nX-Partial: "


def stall(address: tuple[str, int]) -> socket.socket:
    sock = socket.create_connection(address, timeout=120)
    sock.sendall(HALF_HEAD)
    return sock


def check_slow_heads(appd, count: int, workers: int, header_timeout: float) -> None:
    """`count` stalled heads, then one normal request behind them."""
    before = worker_pids(appd)
    address = address_of(appd)
    stalled = [stall(address) for _ in range(count)]
    started = time.monotonic()
    # Each worker holds one stalled head at a time for up to header_timeout
    # (checked every READ_TICK); the normal request waits its turn in the backlog.
    bound = -(-count // workers) * (header_timeout + READ_TICK) + 15.0
    status, _, body = appd.get("/after", timeout=bound)
    waited = time.monotonic() - started
    assert status == 200 and body.startswith(b"GET /after"), (status, body)
    assert waited < bound
    for sock in stalled:
        with sock:
            answer = read_until_close(sock, reset_ok=True)
        assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer[:100]
        assert b"Connection: close" in answer
    assert worker_pids(appd) == before, "a worker was replaced"
    assert "worker_timeout" not in appd.log()


def test_stalled_heads_outlive_the_worker_timeout(start_appd):
    # header_timeout 6 > timeout 5: only the heartbeat sent while reading the
    # head keeps the master from killing the two workers as hung.
    appd = start_appd("conformance_app:app", "-w", "2", "--timeout", "5", "--header-timeout", "6")
    before = worker_pids(appd)
    stalled = [stall(address_of(appd)) for _ in range(2)]
    started = time.monotonic()
    for sock in stalled:
        with sock:
            answer = read_until_close(sock, reset_ok=True)
        assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert time.monotonic() - started >= 5.0  # the deadline, not the master, ended them
    assert worker_pids(appd) == before
    assert "worker_timeout" not in appd.log()
    assert appd.get("/")[0] == 200


def test_twenty_stalled_heads_against_two_workers(start_appd):
    appd = start_appd("conformance_app:app", "-w", "2", "--timeout", "5", "--header-timeout", "0.5")
    check_slow_heads(appd, count=20, workers=2, header_timeout=0.5)


def test_trickling_head_meets_the_deadline(start_appd):
    # One byte every 0.3 s never lets a recv time out; the deadline still holds.
    appd = start_appd("conformance_app:app", "-w", "1", "--header-timeout", "2")
    with socket.create_connection(address_of(appd), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: a\r\n")
        started = time.monotonic()

        def answered():
            try:
                sock.send(b"X")
            except OSError:
                return True  # closed on us: the answer is in the receive buffer
            sock.settimeout(0.3)
            try:
                return sock.recv(65536, socket.MSG_PEEK)
            except TimeoutError:
                return False
        wait_until(answered, timeout=20, interval=0.0, message="the 408")
        assert sock.recv(65536).startswith(b"HTTP/1.1 408 ")
    assert time.monotonic() - started >= 1.5
