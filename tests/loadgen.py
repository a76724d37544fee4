"""A small, bounded HTTP load generator for tests and benchmarks.

    with Load("127.0.0.1:8000", threads=8) as load:
        ...                      # operate on the server while requests flow
    assert not load.failures, load.report()
    print(load.max_latency)

`threads` threads each send GET `path`, every request on a new connection
(so every request goes through accept), for as long as the `with` block is
open, and never longer than `max_seconds`. Every request is recorded as a
`Result` (start time, latency, status or error, the start of the body).
Entering the block waits until the first request succeeded, so the load is
proven to be flowing before the operation under test begins.

KeepAliveLoad is the same with persistent connections, as a client pool or a
proxy keeps them: each thread holds one HTTP/1.1 connection and POSTs on it
with a think time between requests, never retrying (a failed request is
recorded, and the next one opens a new connection).

Addresses are "host:port", "[v6]:port" or "unix:/path".
"""

from __future__ import annotations

import http.client
import random
import threading
import time
from dataclasses import dataclass

from conftest import UnixHTTPConnection

__all__ = ["KeepAliveLoad", "Load", "Result"]


@dataclass
class Result:
    started: float        # time.monotonic() when the connection was opened
    latency: float        # seconds from connect to the end of the body (or the error)
    status: int | None    # HTTP status, None when the request raised
    error: str | None     # repr of the exception, None when a response came back
    body: bytes = b""     # the first 200 bytes of the body
    reconnect: bool = False  # (keep-alive) sent on a new connection after the previous one closed

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and 200 <= self.status < 400


def _connection(address: str, timeout: float) -> http.client.HTTPConnection:
    if address.startswith("unix:"):
        return UnixHTTPConnection(address[5:], timeout)
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


class Load:
    def __init__(self, address: str, threads: int = 8, path: str = "/", max_seconds: float = 60.0,
                 request_timeout: float = 10.0, pause: float = 0.0):
        self.address = address
        self.threads = threads
        self.path = path
        self.max_seconds = max_seconds
        self.request_timeout = request_timeout
        self.pause = pause
        self.results: list[Result] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.started = self.stopped = 0.0

    # --- the context manager ---

    def __enter__(self) -> "Load":
        self.started = time.monotonic()
        self._workers = [threading.Thread(target=self._run, name=f"load-{i}", daemon=True)
                         for i in range(self.threads)]
        for worker in self._workers:
            worker.start()
        deadline = self.started + min(10.0, self.max_seconds)
        while not any(r.ok for r in self.snapshot()):
            if time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise AssertionError(f"load on {self.address}{self.path} never got a response: "
                                     f"{self.report()}")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.request_timeout + 1.0)
        self.stopped = time.monotonic()

    def _run(self) -> None:
        end = self.started + self.max_seconds
        while not self._stop.is_set() and time.monotonic() < end:
            self._record(self._one())
            if self.pause:
                self._stop.wait(self.pause)

    def _one(self) -> Result:
        started = time.monotonic()
        conn = _connection(self.address, self.request_timeout)
        try:
            conn.request("GET", self.path, headers={"Connection": "close"})
            response = conn.getresponse()
            body = response.read()
            return Result(started, time.monotonic() - started, response.status, None, body[:200])
        except Exception as exc:  # every outcome is recorded, none is raised
            return Result(started, time.monotonic() - started, None, repr(exc))
        finally:
            conn.close()

    def _record(self, result: Result) -> None:
        with self._lock:
            self.results.append(result)

    # --- what happened ---

    def snapshot(self) -> list[Result]:
        """The results so far (safe while the load runs)."""
        with self._lock:
            return list(self.results)

    @property
    def failures(self) -> list[Result]:
        return [r for r in self.snapshot() if not r.ok]

    @property
    def max_latency(self) -> float:
        return max((r.latency for r in self.snapshot()), default=0.0)

    def between(self, start: float, end: float) -> list[Result]:
        """Requests that were in flight at some point between two monotonic times."""
        return [r for r in self.snapshot() if r.started <= end and r.started + r.latency >= start]

    def wait_for(self, count: int, timeout: float = 10.0) -> None:
        """Wait until `count` more requests have completed (proves the load still flows)."""
        target = len(self.snapshot()) + count
        deadline = time.monotonic() + timeout
        while len(self.snapshot()) < target:
            if time.monotonic() > deadline or self._stop.is_set():
                raise AssertionError(f"load stalled: {self.report()}")
            time.sleep(0.01)

    def report(self) -> str:
        results = self.snapshot()
        failures = [r for r in results if not r.ok]
        text = (f"{len(results)} requests, {len(failures)} failed, "
                f"max latency {max((r.latency for r in results), default=0.0):.3f} s")
        for failure in failures[:5]:
            text += f"\n  failed: status={failure.status} error={failure.error} body={failure.body!r}"
        return text


class KeepAliveLoad(Load):
    """`clients` threads, each with one persistent connection (http.client),
    POSTing `body_size` bytes, then thinking 0 to `think` seconds."""

    def __init__(self, address: str, clients: int = 16, path: str = "/", body_size: int = 100,
                 think: float = 0.02, max_seconds: float = 60.0, request_timeout: float = 10.0,
                 seed: int = 0):
        super().__init__(address, threads=clients, path=path, max_seconds=max_seconds,
                         request_timeout=request_timeout)
        self.payload = b"x" * body_size
        self.think = think
        self.seed = seed

    def _run(self) -> None:
        rng = random.Random(f"{self.seed}-{threading.current_thread().name}")
        end = self.started + self.max_seconds
        conn = _connection(self.address, self.request_timeout)
        first = True
        try:
            while not self._stop.is_set() and time.monotonic() < end:
                # http.client reopens on demand after a `Connection: close` or an error.
                reconnect = conn.sock is None and not first
                first = False
                self._record(self._post(conn, reconnect))
                self._stop.wait(rng.uniform(0.0, self.think))
        finally:
            conn.close()

    def _post(self, conn: http.client.HTTPConnection, reconnect: bool) -> Result:
        started = time.monotonic()
        try:
            conn.request("POST", self.path, body=self.payload, headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            body = response.read()
            return Result(started, time.monotonic() - started, response.status, None, body[:200], reconnect)
        except Exception as exc:  # recorded, never retried
            conn.close()
            return Result(started, time.monotonic() - started, None, repr(exc), reconnect=reconnect)

    @property
    def reconnects(self) -> int:
        return sum(r.reconnect for r in self.snapshot())

    def report(self) -> str:
        return super().report() + f", {self.reconnects} reconnects"
