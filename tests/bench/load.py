"""Load generators: wrk (throughput figures) and a bounded Python client that
records the outcome and latency of every single request (zero-downtime figures,
and the throughput fallback when wrk is not installed)."""

from __future__ import annotations

import bisect
import multiprocessing
import re
import shutil
import socket
import subprocess
import threading
import time
from array import array
from dataclasses import dataclass, field

# --- wrk -------------------------------------------------------------------

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _seconds(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)([a-z]+)", text).groups()
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> dict:
    """requests/s, latency percentiles and error counters from `wrk --latency` output."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not rps:
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    result = {"rps": float(rps.group(1)), "errors": 0}
    latency = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", output, re.M)  # avg, stdev, max
    if latency:
        result["max_s"] = _seconds(latency.group(1))
    for pct, value in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)[ \t]*$", output, re.M):
        result[f"p{pct}_s"] = _seconds(value)
    total = re.search(r"(\d+) requests in", output)
    result["requests"] = int(total.group(1)) if total else None
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if errors:
        result["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"), map(int, errors.groups())))
        result["errors"] += sum(result["socket_errors"].values())
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        result["errors"] += int(non2xx.group(1))
    return result


def run_wrk(url: str, threads: int = 2, connections: int = 32, duration: float = 10.0) -> dict:
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(round(duration))}s", "--latency", url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}")
    return parse_wrk(out.stdout)


# --- the Python client -------------------------------------------------------

OK = 0
# Failure kinds, by code (array('b') stores the code of each request).
FAILURES = {1: "refused", 2: "reset", 3: "timeout", 4: "incomplete", 5: "bad_status", 6: "other"}


def _one_request(host: str, port: int, payload: bytes, timeout: float) -> int:
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(payload)
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
    except ConnectionRefusedError:
        return 1
    except (ConnectionResetError, BrokenPipeError):
        return 2
    except socket.timeout:
        return 3
    except OSError:
        return 6
    response = b"".join(chunks)
    head, sep, body = response.partition(b"\r\n\r\n")
    if not sep:
        return 4
    if not head.startswith(b"HTTP/1.1 200 ") and not head.startswith(b"HTTP/1.0 200 "):
        return 5
    length = re.search(rb"\r\ncontent-length:\s*(\d+)", head, re.I)
    if length and int(length.group(1)) != len(body):
        return 4
    return OK


def _client_process(host, port, path, threads, stop, hard_stop_at, timeout, pipe):
    """One load process: `threads` closed-loop threads, a new connection per request."""
    payload = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
    records = []

    def loop():
        starts, latencies, codes = array("d"), array("d"), array("b")
        records.append((starts, latencies, codes))
        clock = time.monotonic
        while not stop.is_set() and clock() < hard_stop_at:
            t0 = clock()
            code = _one_request(host, port, payload, timeout)
            t1 = clock()
            starts.append(t0)
            latencies.append(t1 - t0)
            codes.append(code)
            if code == 1:  # refused: do not spin
                time.sleep(0.001)

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(0.0, hard_stop_at - time.monotonic()) + timeout + 1)
    starts, latencies, codes = array("d"), array("d"), array("b")
    for s, l, c in records:
        starts.extend(s)
        latencies.extend(l)
        codes.extend(c)
    pipe.send((starts.tobytes(), latencies.tobytes(), codes.tobytes()))
    pipe.close()


@dataclass
class LoadResult:
    starts: array = field(default_factory=lambda: array("d"))
    latencies: array = field(default_factory=lambda: array("d"))
    codes: array = field(default_factory=lambda: array("b"))
    began: float = 0.0
    ended: float = 0.0

    @property
    def count(self) -> int:
        return len(self.codes)

    def failures(self, windows=None) -> dict:
        kinds: dict[str, int] = {}
        for i in self._indices(windows):
            if self.codes[i] != OK:
                name = FAILURES[self.codes[i]]
                kinds[name] = kinds.get(name, 0) + 1
        return kinds

    def _indices(self, windows=None):
        if windows is None:
            return range(self.count)
        # A request belongs to a window if its [start, end] overlaps it. Windows are
        # disjoint, so only the last one that begins before the request ends can overlap.
        windows = sorted(windows)
        w_starts = [w[0] for w in windows]
        picked = []
        for i in range(self.count):
            start = self.starts[i]
            k = bisect.bisect_right(w_starts, start + self.latencies[i]) - 1
            if k >= 0 and windows[k][1] >= start:
                picked.append(i)
        return picked

    def latency_stats(self, windows=None) -> dict:
        values = sorted(self.latencies[i] for i in self._indices(windows))
        if not values:
            return {"requests": 0, "p50_s": None, "p99_s": None, "max_s": None}
        return {"requests": len(values), "p50_s": percentile(values, 50),
                "p99_s": percentile(values, 99), "max_s": values[-1]}

    def rps(self) -> float:
        return self.count / (self.ended - self.began) if self.ended > self.began else 0.0


def percentile(sorted_values, pct: float) -> float:
    index = min(len(sorted_values) - 1, max(0, int(round(pct / 100 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[index]


class PyLoad:
    """Closed-loop load with `connections` concurrent requests spread over
    `processes` processes; bounded by `max_seconds` whatever happens."""

    def __init__(self, address: str, path: str = "/", connections: int = 32, processes: int = 4,
                 timeout: float = 30.0, max_seconds: float = 900.0):
        host, _, port = address.rpartition(":")
        self.host, self.port, self.path = host, int(port), path
        self.connections, self.processes = connections, processes
        self.timeout, self.max_seconds = timeout, max_seconds
        self._ctx = multiprocessing.get_context("fork")
        self._procs: list = []
        self._pipes: list = []
        self._stop = self._ctx.Event()
        self.result = LoadResult()

    def start(self) -> "PyLoad":
        hard_stop_at = time.monotonic() + self.max_seconds
        per_proc = [self.connections // self.processes + (1 if i < self.connections % self.processes else 0)
                    for i in range(self.processes)]
        self.result.began = time.monotonic()
        for threads in per_proc:
            parent, child = self._ctx.Pipe(duplex=False)
            proc = self._ctx.Process(target=_client_process, daemon=True,
                                     args=(self.host, self.port, self.path, threads, self._stop,
                                           hard_stop_at, self.timeout, child))
            proc.start()
            child.close()
            self._procs.append(proc)
            self._pipes.append(parent)
        return self

    def stop(self) -> LoadResult:
        self._stop.set()
        self.result.ended = time.monotonic()
        deadline = time.monotonic() + self.timeout + 10
        for proc, pipe in zip(self._procs, self._pipes):
            if pipe.poll(max(0.1, deadline - time.monotonic())):
                starts, latencies, codes = pipe.recv()
                self.result.starts.frombytes(starts)
                self.result.latencies.frombytes(latencies)
                self.result.codes.frombytes(codes)
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        return self.result

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        if not self._stop.is_set():
            self.stop()


def run_pyload(address: str, duration: float, connections: int = 32, path: str = "/") -> dict:
    """The wrk fallback: requests/s and percentiles over `duration` seconds."""
    load = PyLoad(address, path, connections=connections, max_seconds=duration + 5).start()
    time.sleep(duration)  # the measured interval itself
    result = load.stop()
    stats = result.latency_stats()
    return {"rps": result.rps(), "p50_s": stats["p50_s"], "p99_s": stats["p99_s"],
            "requests": result.count, "errors": sum(result.failures().values())}
