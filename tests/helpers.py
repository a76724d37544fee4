"""Small checks shared by the test modules (the fixtures and the Appd harness
are in conftest.py): which workers serve, is the service still healthy, and
reaping the orphans of a SIGKILLed daemon."""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
import time

from loadgen import KeepAliveLoad

_PR_SET_CHILD_SUBREAPER = 36


def worker_pids(source) -> set[int]:
    """The worker pids of a generation (a dict from `status`), or of the serving
    generation of a `status` dict or of a running Appd."""
    generation = source
    if not isinstance(source, dict) or "generations" in source:
        status = source if isinstance(source, dict) else source.status()
        generation = [g for g in status["generations"] if g["state"] == "serving"][-1]
    return {w["pid"] for w in generation["workers"]}


def assert_healthy(appd) -> dict:
    """The daemon is alive, `status` answers, and the service serves 200; returns the status."""
    assert appd.proc.poll() is None, f"appd exited with {appd.proc.returncode}:\n{appd.log()}"
    status = appd.status()
    assert status["daemon"]["pid"] == appd.pid
    assert appd.get("/")[0] == 200
    return status


def address_of(appd) -> tuple[str, int]:
    """(host, port) of the first TCP listener, for raw sockets."""
    host, _, port = appd.address.rpartition(":")
    return host.strip("[]"), int(port)


@contextlib.contextmanager
def reaping_orphans():
    """Make this test process the subreaper for orphans while it runs, as a real
    init would be: this container's PID 1 never reaps, so without it a SIGKILLed
    daemon's masters would stay zombies and "gone" could not be observed.
    Yields reap(pids), which collects those of `pids` that exited."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)

    def reap(pids):
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)

    try:
        yield reap
    finally:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for programs that need a number)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keepalive_soak(appd, seconds: float) -> tuple[list[str], KeepAliveLoad]:
    """16 persistent clients (tests/loadgen.py) while upgrades and reloads alternate
    for `seconds`, each exiting 0; returns (the operations run, the finished load)."""
    operations = []
    with KeepAliveLoad(appd.address, clients=16, max_seconds=seconds + 60) as load:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for op in ("upgrade", "reload"):
                result = appd.ctl(op)
                assert result.returncode == 0, result.stdout + result.stderr
                operations.append(op)
        load.wait_for(50)
    return operations, load
