"""Scenario: slow clients. 20 connections send half a request head and go quiet
while one client times ordinary requests (a new connection each), against
2 sync workers and 2 gthread workers with 2 threads, appd beside gunicorn 27.

appd reads gthread heads in the poller (a slow client holds no thread) and
answers a head later than header_timeout with 408 (3 s here). A sync worker
serves one connection at a time, so a request queued behind the stalled heads
waits at most (stalled heads per worker) × header_timeout; gunicorn has no
deadline for a request head.
"""

from __future__ import annotations

import http.client
import socket
import time

from common import HELLO, Context, Row

SLOW_CLIENTS = 20
HEADER_TIMEOUT = 3.0
HALF_HEAD = b"GET / HTTP/1.1\r\nHost: bench\r\n"


def _stall(address: str) -> list[socket.socket]:
    host, port = address.rsplit(":", 1)
    stalled = []
    for _ in range(SLOW_CLIENTS):
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(HALF_HEAD)
        stalled.append(sock)
    return stalled


def _timed_requests(address: str, seconds: float) -> dict:
    """Sequential GETs, each on a new connection, for `seconds`: latencies and failures."""
    host, port = address.rsplit(":", 1)
    latencies, failed = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, int(port), timeout=40)
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                failed += 1
        except OSError:
            failed += 1
        finally:
            conn.close()
        latencies.append(time.perf_counter() - started)
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] if latencies else None
    return {"requests": len(latencies), "failed": failed, "p99_s": p99,
            "max_s": latencies[-1] if latencies else None}


def _measure(server, seconds: float) -> dict:
    stalled = _stall(server.address)
    try:
        return _timed_requests(server.address, seconds)
    finally:
        for sock in stalled:
            sock.close()


def slow_heads(ctx: Context):
    seconds = 4.0 if ctx.quick else 8.0
    rows, raw = [], {}
    for label, threads in (("sync -w 2", None), ("gthread -w 2 --threads 2", 2)):
        options = {"threads": threads, "env": {"APPD_HEADER_TIMEOUT": str(HEADER_TIMEOUT)}}
        with ctx.appd(HELLO, 2, **options) as appd, ctx.gunicorn(HELLO, 2, **options) as gunicorn:
            ours, theirs = _measure(appd, seconds), _measure(gunicorn, seconds)
        raw[label] = {"appd": ours, "gunicorn": theirs}
        if threads:  # the stalled heads wait in the poller: nobody notices them
            figure, value, other, target, ok = ("p99", ours["p99_s"], theirs["p99_s"], "< 20 ms",
                                                ours["p99_s"] is not None and ours["p99_s"] < 0.020)
        else:  # one connection per worker: a request queued behind the stalled heads
            # waits for each of them to meet header_timeout, and no longer
            bound = SLOW_CLIENTS / 2 * HEADER_TIMEOUT
            figure, value, other, target, ok = ("max", ours["max_s"], theirs["max_s"],
                                                f"≤ {SLOW_CLIENTS // 2} × header_timeout ({bound:g} s)",
                                                ours["max_s"] is not None and ours["max_s"] <= bound + 1.0)
        ok = ok and ours["failed"] == 0
        rows.append(Row("slow heads", f"{label}: {figure} latency of normal requests, {SLOW_CLIENTS} stalled heads",
                        value, other, "s", target, ok,
                        f"requests {ours['requests']} vs {theirs['requests']}, failed {ours['failed']} vs "
                        f"{theirs['failed']}, max {ours['max_s']:.2f} vs {theirs['max_s']:.2f} s"))
    return rows, raw
