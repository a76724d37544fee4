"""Tools shared by the chaos suite and tests/test_reliability.py: what a daemon
holds (fds, threads, RSS), every process that belongs to it, the seeded
control-socket fuzzer and a `status` latency probe."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import struct
import tempfile
import threading
import time
from dataclasses import dataclass, field

import msgpack
import psutil

from appdctl import Client, protocol

_LENGTH = struct.Struct(">I")
CHANGING = {name for name, (changing, _) in protocol.COMMANDS.items() if changing}


# --- what the daemon holds ---

@dataclass
class Usage:
    fds: int
    threads: int
    rss: int
    fd_targets: list[str] = field(default_factory=list)

    def line(self) -> str:
        return f"fds {self.fds}, threads {self.threads}, rss {self.rss / 2**20:.1f} MiB"


def usage(pid: int) -> Usage:
    process = psutil.Process(pid)
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
    return Usage(process.num_fds(), process.num_threads(), process.memory_info().rss, sorted(targets))


def settled_usage(pid: int, baseline: Usage, fd_slack: int = 2, timeout: float = 10.0) -> Usage:
    """The daemon's usage once it is back within `fd_slack` fds and at its thread
    count (descriptors of exited generations close when their last output EOFs);
    returns the last reading when it never settles, for the assertion to show."""
    deadline = time.monotonic() + timeout
    while True:
        now = usage(pid)
        if (now.fds <= baseline.fds + fd_slack and now.threads == baseline.threads) \
                or time.monotonic() > deadline:
            return now
        time.sleep(0.1)


def unlinked_files(pid: int) -> list[str]:
    """Descriptors of a process that point at deleted files or memfds (hidden temp files)."""
    return [t for t in usage(pid).fd_targets if t.endswith("(deleted)") or t.startswith("/memfd:")]


def temp_entries() -> set[str]:
    """Names in the system temp dir and /dev/shm that look like ours. (The tests
    name their own temp dirs test-*, so one running beside a leak check does not
    count as a leak.)"""
    found = set()
    for directory in {tempfile.gettempdir(), "/tmp", "/dev/shm"}:
        with contextlib.suppress(OSError):
            found |= {os.path.join(directory, n) for n in os.listdir(directory) if "appd" in n.lower()}
    return found


# --- every process that belongs to a daemon ---

def tree(daemon_pid: int) -> list[psutil.Process]:
    """The daemon and all its descendants (zombies included)."""
    root = psutil.Process(daemon_pid)
    return [root, *root.children(recursive=True)]


def belongs_to(process: psutil.Process, daemon_pid: int) -> bool:
    """Masters get APPD_DAEMON_PID in their environment and workers inherit it."""
    try:
        return process.environ().get("APPD_DAEMON_PID") == str(daemon_pid)
    except psutil.Error:
        return False


def census(daemon_pid: int) -> dict:
    """Walk the daemon's tree and the whole machine for its processes.

    Returns {"tree": [...], "zombies": [...], "strays": [...], "orphans": [...]}:
    strays belong to this daemon (by environment) but are outside its tree;
    orphans are those of them whose parent is PID 1 and whose title is ours."""
    members = tree(daemon_pid)
    in_tree = {p.pid for p in members}
    zombies = []
    for process in members:
        with contextlib.suppress(psutil.Error):
            if process.status() == psutil.STATUS_ZOMBIE:
                zombies.append(process.pid)
    strays, orphans = [], []
    for process in psutil.process_iter(["pid", "ppid", "cmdline"]):
        if process.pid in in_tree or not belongs_to(process, daemon_pid):
            continue
        strays.append(process.pid)
        title = " ".join(process.info["cmdline"] or [])
        if process.info["ppid"] == 1 and title.startswith("appd:"):
            orphans.append(process.pid)
    return {"tree": sorted(in_tree), "zombies": zombies, "strays": strays, "orphans": orphans}


def titles(pids) -> dict[int, str]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            out[pid] = " ".join(psutil.Process(pid).cmdline()).strip()
    return out


def still_there(pids) -> list[int]:
    """Pids that are running or unreaped zombies."""
    left = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            psutil.Process(pid).status()
            left.append(pid)
    return left


# --- the control-socket fuzzer ---

class FrameFuzzer:
    """Seeded random frames for the control socket. Never a valid changing
    command: any request naming one carries an unknown argument, so the daemon
    must refuse it (the fuzzer cannot stop or upgrade the service by luck)."""

    KINDS = (("request", 35), ("object", 20), ("garbage", 15), ("truncated", 10),
             ("oversized", 5), ("empty", 5), ("pipelined", 5), ("raw_str", 5))

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self._kinds = [k for k, w in self.KINDS for _ in range(w)]

    def value(self, depth: int = 0):
        rng = self.rng
        kind = rng.choice("ifsbnlmtx" if depth < 3 else "ifsbnt")
        if kind == "i":
            return rng.choice([0, 1, -1, 2**31, -(2**63), 2**64 - 1, rng.randint(-1000, 1000)])
        if kind == "f":
            return rng.choice([0.5, -1e300, float("inf"), float("nan")])
        if kind == "s":
            return "".join(rng.choice("abcdefgh_é\x00☃") for _ in range(rng.randint(0, 12)))
        if kind == "b":
            return rng.randbytes(rng.randint(0, 16))
        if kind == "n":
            return None
        if kind == "t":
            return rng.choice([True, False])
        if kind == "x":
            return msgpack.ExtType(rng.randint(0, 127), rng.randbytes(rng.randint(0, 8)))
        if kind == "l":
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {self.key(): self.value(depth + 1) for _ in range(rng.randint(0, 4))}

    def key(self):
        return self.rng.choice(["v", "id", "cmd", "args", "pid", "delta", "wait", self.rng.randint(0, 9),
                                self.rng.randbytes(2)])

    def request(self) -> dict:
        rng = self.rng
        message = {}
        if rng.random() < 0.9:
            message["v"] = rng.choice([1, 1, 1, 2, "1", None, 1.0])
        if rng.random() < 0.9:
            message["id"] = rng.choice([rng.randint(0, 2**31), -1, 2**63, "7", None, True, 1.5])
        if rng.random() < 0.95:
            message["cmd"] = rng.choice([*protocol.COMMANDS, "STATUS", "", "shutdown", 3, None,
                                         "status\x00", "x" * 300])
        if rng.random() < 0.8:
            message["args"] = rng.choice([{}, None, [], "args", self.value(1),
                                          {"delta": self.value(2), "pid": self.value(2)}])
        for _ in range(rng.randint(0, 2)):
            message[self.key()] = self.value(2)
        if isinstance(message.get("cmd"), str) and message["cmd"] in CHANGING:
            args = message.get("args")
            if args is None or isinstance(args, dict):
                message["args"] = {**(args or {}), "fuzz_guard": True}
        return message

    def frame(self) -> "Frame":
        """One frame, and what the daemon must do about it."""
        rng = self.rng
        kind = rng.choice(self._kinds)
        if kind in ("request", "pipelined"):
            requests = [self.request() for _ in range(1 if kind == "request" else rng.randint(2, 5))]
            data = b"".join(_frame(msgpack.packb(r, use_bin_type=True)) for r in requests)
            ids = [r["id"] if type(r.get("id")) is int else None for r in requests]
            return Frame(kind, data, "reply", ids)
        if kind == "object":
            value = self.value()
            if isinstance(value, dict):
                value.pop("cmd", None)  # never a request by chance
            return Frame(kind, _frame(msgpack.packb(value, use_bin_type=True)), "reply", [None])
        if kind == "raw_str":  # old-style raw strings: bytes in them are not UTF-8 text
            data = _frame(msgpack.packb(self.request(), use_bin_type=False))
            return Frame(kind, data, "close_or_reply")
        if kind == "garbage":  # random bytes are rarely one msgpack value; then they get a reply
            return Frame(kind, _frame(rng.randbytes(rng.randint(1, 64))), "close_or_reply")
        if kind == "truncated":
            data = _frame(msgpack.packb(self.request(), use_bin_type=True))
            return Frame(kind, data[:rng.randint(1, len(data) - 1)], "hang_up")
        if kind == "oversized":
            length = rng.choice([protocol.MAX_FRAME + 1, 2**31, 2**32 - 1])
            return Frame(kind, _LENGTH.pack(length) + rng.randbytes(rng.randint(0, 64)), "close")
        return Frame(kind, _LENGTH.pack(0), "close")  # an empty body is not a msgpack map


@dataclass
class Frame:
    kind: str
    data: bytes
    expect: str                 # "reply" (one per id), "close", "close_or_reply", "hang_up" (we do)
    ids: list = field(default_factory=list)  # per request: the id the reply must carry, None: unchecked


def _frame(body: bytes) -> bytes:
    return _LENGTH.pack(len(body)) + body


# --- status latency, measured while something else happens ---

class StatusProbe:
    """A thread asking `status` back to back (one connection, as a monitoring
    agent would), recording every latency and every error."""

    def __init__(self, socket_path: str, interval: float = 0.005):
        self.socket_path = socket_path
        self.interval = interval
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status-probe", daemon=True)

    def __enter__(self) -> "StatusProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        client = Client(self.socket_path, timeout=10)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    client.call("status")
                    self.latencies.append(time.perf_counter() - started)
                except Exception as exc:  # recorded: the assertion shows them
                    self.errors.append(repr(exc))
                    client.close()
                self._stop.wait(self.interval)
        finally:
            client.close()

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        if not ordered:
            return float("inf")
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> str:
        if not self.latencies:
            return f"status: no answer ({len(self.errors)} errors)"
        return (f"status: {len(self.latencies)} calls, p50 {self.percentile(0.5) * 1e3:.1f} ms, "
                f"p99 {self.percentile(0.99) * 1e3:.1f} ms, max {max(self.latencies) * 1e3:.1f} ms, "
                f"errors {len(self.errors)}")


def half_written_frame(socket_path: str) -> socket.socket:
    """A client that announces a 100-byte frame, sends 10 bytes of it and holds on."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(socket_path)
    sock.sendall(_LENGTH.pack(100) + b"\x85" + b"\xa1v" * 4 + b"\x01")
    return sock
