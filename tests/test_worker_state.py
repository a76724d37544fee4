"""WorkerHandle, the master's view of one worker: its WorkerState transitions and
the named questions the master asks, driven by a real notify socket and a real
child process (the signals are real)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import pytest

from appd.worker_handle import WorkerHandle, WorkerState


@pytest.fixture
def handle():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    master_end.setblocking(False)
    handle = WorkerHandle(child.pid, master_end, serial=1)
    handle.worker_end = worker_end  # the worker's side of the notify socket, for the test to speak
    yield handle
    child.kill()
    child.wait(timeout=10)
    handle.close()
    worker_end.close()


def questions(handle) -> dict:
    return {"target": handle.counts_toward_target(), "serving": handle.serving(),
            "taking": handle.taking_requests(), "outgoing": handle.outgoing(),
            "stopping": handle.stopping(), "status": handle.status}


def test_a_worker_boots_serves_is_replaced_and_stops(handle):
    assert handle.state is WorkerState.BOOTING
    assert questions(handle) == {"target": True, "serving": False, "taking": False,
                                 "outgoing": False, "stopping": False, "status": "booting"}
    handle.worker_end.send(b"READY=1\nX_APPD_REQUESTS=0")
    assert handle.read_reports() is True and handle.ready
    assert questions(handle)["serving"] and questions(handle)["taking"]

    handle.replace()  # a reload, retire or recycle: it serves until a successor is ready
    assert questions(handle) == {"target": False, "serving": False, "taking": True,
                                 "outgoing": True, "stopping": False, "status": "outgoing"}
    handle.keep()  # the reload was undone
    assert handle.state is WorkerState.READY

    handle.stop(signal.SIGTERM, grace=30.0)
    assert questions(handle) == {"target": False, "serving": False, "taking": False,
                                 "outgoing": False, "stopping": True, "status": "stopping"}
    assert handle.exit_expected() and handle.stopping_gracefully()


def test_a_hung_worker_is_killed_and_shown_as_stopping(handle):
    handle.mark_ready()
    assert handle.hung(handle.last_heartbeat + 31, timeout=30.0)
    assert not handle.hung(handle.last_heartbeat + 31, timeout=0), "timeout 0: no limit"
    handle.force(signal.SIGKILL, grace=2.0)
    assert handle.killed() and handle.status == "stopping" and not handle.stopping_gracefully()
    assert handle.counts_toward_target(), "its successor is forked once it is reaped"
    assert not handle.replaceable() and not handle.taking_requests()
    handle.stop(signal.SIGTERM, grace=30.0)  # a drain meanwhile does not make it graceful again
    assert handle.killed() and not handle.counts_toward_target()
    assert handle.overdue(handle.kill_at) and not handle.overdue(handle.kill_at - 1)


def test_a_worker_that_never_got_ready_failed_to_boot(handle):
    handle.worker_end.send(b"X_APPD_BOOT_ERROR=Traceback...\nImportError: no module named shop")
    assert handle.read_reports() is False
    assert not handle.exit_expected()
    reason, output = handle.boot_failure("exit 1")
    assert reason == f"worker {handle.pid} failed to boot (exit 1): ImportError: no module named shop"
    assert output.startswith("Traceback")
