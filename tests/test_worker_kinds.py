"""Worker kinds beyond sync: gthread (threads, keep-alive, pipelining) and
command (any program on inherited sockets: a plain Python server, uvicorn)."""

from __future__ import annotations

import concurrent.futures
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import running_appd, wait_until
from loadgen import Load

PYTHON = sys.executable


def _connect(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _read_response(sock: socket.socket, buffer: bytearray) -> bytes:
    """One Content-Length delimited response from `sock` (extra bytes stay in `buffer`)."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before a response head")
        buffer += chunk
    head, _, _ = bytes(buffer).partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    total = len(head) + 4 + length
    while len(buffer) < total:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        buffer += chunk
    response = bytes(buffer[:total])
    del buffer[:total]
    return response


GET = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(scope="module")
def gthread_appd(tmp_path_factory):
    """One gthread worker with two threads for the tests that only make requests."""
    with running_appd(tmp_path_factory.mktemp("gthread"), "--worker-class", "gthread", "--threads", "2",
                      "-w", "1", "--keepalive", "10") as appd:
        yield appd


def test_gthread_keeps_connections_alive(gthread_appd):
    appd = gthread_appd
    sock = _connect(appd.address)
    buffer = bytearray()
    try:
        pids = set()
        for _ in range(5):
            sock.sendall(GET)
            response = _read_response(sock, buffer)
            assert response.startswith(b"HTTP/1.1 200")
            assert b"connection: close" not in response.lower()
            pids.add(response.rsplit(b"pid ", 1)[1].strip())
        assert len(pids) == 1, "all five requests went over one connection to one worker"
    finally:
        sock.close()


def test_gthread_serves_pipelined_requests_in_order(gthread_appd):
    appd = gthread_appd
    sock = _connect(appd.address)
    buffer = bytearray()
    try:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n"
                     b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        first, second, third = (_read_response(sock, buffer) for _ in range(3))
    finally:
        sock.close()
    assert first.startswith(b"HTTP/1.1 200") and first.endswith(b"ok\n")
    assert second.startswith(b"HTTP/1.1 404")
    assert third.startswith(b"HTTP/1.1 200") and b"Hello from appd" in third


def test_gthread_counts_each_request_once_in_status(start_appd):
    """Without max_requests or request hooks the threads count on a shared counter,
    without the lock; status must still say exactly how many were served, and
    which thread is busy for how long."""
    appd = start_appd("--worker-class", "gthread", "--threads", "2", "-w", "1", "--keepalive", "10")
    socks = [_connect(appd.address) for _ in range(2)]
    buffer = bytearray()
    try:
        for i in range(4):
            socks[i % 2].sendall(GET)
            assert _read_response(socks[i % 2], buffer).startswith(b"HTTP/1.1 200")
        socks[0].sendall(GET * 3)  # pipelined: served in one turn
        for _ in range(3):
            assert _read_response(socks[0], buffer).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()

    def requests():
        return sum(w["requests"] for w in appd.serving_generation()["workers"])
    wait_until(lambda: requests() == 7, 10, message=f"status to count 7 requests (says {requests()})")

    slow = _connect(appd.address)  # a request in progress shows as busy, with its age
    try:
        slow.sendall(b"GET /slow?s=3 HTTP/1.1\r\nHost: x\r\n\r\n")

        def busy_worker():
            (worker,) = appd.serving_generation()["workers"]
            return worker if worker.get("busy") == 1 and worker["request_age_s"] > 0.5 else None
        worker = wait_until(busy_worker, 10, message="status to show the thread in its slow request")
        assert worker["request_age_s"] < 3.5
    finally:
        slow.close()


def test_gthread_more_idle_connections_than_threads(gthread_appd):
    """Idle keep-alive connections wait in the poller, not in a thread."""
    appd = gthread_appd
    socks = [_connect(appd.address) for _ in range(8)]
    buffers = [bytearray() for _ in socks]
    try:
        for _ in range(2):
            for sock, buffer in zip(socks, buffers):
                sock.sendall(GET)
                assert _read_response(sock, buffer).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()


def test_gthread_slow_request_does_not_hold_up_others_ready_at_the_same_time(gthread_appd):
    """A thread takes several ready connections at once; while it is stuck in a slow
    request, the others it took go to the free thread instead of waiting behind it.
    The requests are sent in one burst so that they are ready together."""
    appd = gthread_appd
    for _ in range(2):
        slow, *quick = socks = [_connect(appd.address) for _ in range(4)]
        buffers = [bytearray() for _ in socks]
        try:
            slow.sendall(b"GET /slow?s=2.5 HTTP/1.1\r\nHost: x\r\n\r\n")
            for sock in quick:
                sock.sendall(GET)
            started = time.monotonic()
            for sock, buffer in zip(quick, buffers[1:]):
                assert _read_response(sock, buffer).startswith(b"HTTP/1.1 200")
            waited = time.monotonic() - started
            assert waited < 1.5, f"quick requests waited {waited:.2f} s behind a 2.5 s one"
            assert _read_response(slow, buffers[0]).startswith(b"HTTP/1.1 200")
        finally:
            for sock in socks:
                sock.close()


def test_gthread_request_arriving_while_the_polling_thread_blocks_is_served_beside_it(start_appd):
    """While requests are quick only one thread waits in epoll (the baton); when it
    blocks in a request, a request arriving afterwards is served by the other
    thread, not after the slow one. A fresh worker: no earlier slow request has
    already woken every thread."""
    appd = start_appd("--worker-class", "gthread", "--threads", "2", "-w", "1")
    slow, quick = _connect(appd.address), _connect(appd.address)
    buffers = bytearray(), bytearray()
    try:
        for _ in range(3):  # quick ones first: one thread serves them all
            quick.sendall(GET)
            assert _read_response(quick, buffers[1]).startswith(b"HTTP/1.1 200")
        slow.sendall(b"GET /slow?s=4 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: appd.status()["generations"][0]["workers"][0].get("busy"), timeout=10)
        started = time.monotonic()
        quick.sendall(GET)
        assert _read_response(quick, buffers[1]).startswith(b"HTTP/1.1 200")
        waited = time.monotonic() - started
        assert waited < 1.5, f"a quick request waited {waited:.2f} s behind a 4 s one"
        assert _read_response(slow, buffers[0]).startswith(b"HTTP/1.1 200")
    finally:
        slow.close()
        quick.close()


def test_gthread_requests_blocking_briefly_are_served_in_parallel(start_appd):
    """Requests that each block for 4 ms (a quick database call), shorter than the
    main thread's look at the threads: the worker's threads still serve them side
    by side, not one after another behind the polling thread (found in review: 8
    threads served them at 0.13x the rate before the baton)."""
    appd = start_appd("--worker-class", "gthread", "--threads", "4", "-w", "1")
    clients, each, block = 4, 30, 0.004
    socks = [_connect(appd.address) for _ in range(clients)]
    try:
        def run(sock):
            buffer = bytearray()
            for _ in range(each):
                sock.sendall(f"GET /slow?s={block} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                assert _read_response(sock, buffer).startswith(b"HTTP/1.1 200")
        run(socks[0])  # warm: the app imported, the thread running
        started = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            list(pool.map(run, socks))
        elapsed = time.monotonic() - started
        one_by_one = clients * each * block
        assert elapsed < 0.75 * one_by_one, f"{clients * each} requests of {block * 1000:.0f} ms took " \
                                             f"{elapsed:.2f} s: served one by one ({one_by_one:.2f} s)"
    finally:
        for sock in socks:
            sock.close()


def test_gthread_request_waiting_for_a_busy_thread_is_not_taken_for_idle(start_appd):
    """One thread, busy with a slow request for longer than the keep-alive: a kept
    connection's next request, sent meanwhile, waits for the thread and is answered;
    its keep-alive deadline passing meanwhile does not close it under the request."""
    appd = start_appd("--worker-class", "gthread", "--threads", "1", "-w", "1", "--keepalive", "3")
    kept, slow = _connect(appd.address), _connect(appd.address)
    buffers = bytearray(), bytearray()
    try:
        kept.sendall(GET)
        assert _read_response(kept, buffers[0]).startswith(b"HTTP/1.1 200")
        slow.sendall(b"GET /slow?s=6 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: appd.status()["generations"][0]["workers"][0].get("busy"), timeout=10)
        kept.sendall(GET)  # the only thread is in /slow for 6 s; keep-alive is 3 s
        assert _read_response(kept, buffers[0]).startswith(b"HTTP/1.1 200")
        assert _read_response(slow, buffers[1]).startswith(b"HTTP/1.1 200")
    finally:
        kept.close()
        slow.close()


def test_gthread_drain_answers_idle_connections_next_request_with_close(start_appd, tmp_path):
    """Drain hands nothing on (the whole service stops), yet never closes an idle
    connection under its client: its next request is served, with `Connection:
    close` (HTTP/1.1 and HTTP/1.0 keep-alive alike); a busy one finishes."""
    appd = start_appd("core_probe:app", "--worker-class", "gthread", "--threads", "2", "-w", "1",
                      "--keepalive", "30", env={"CORE_MARK_DIR": str(tmp_path)})
    idle, idle10, busy = (_connect(appd.address) for _ in range(3))
    buffer = bytearray()
    http10 = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    try:
        idle.sendall(GET)
        assert _read_response(idle, buffer).startswith(b"HTTP/1.1 200")
        idle10.sendall(http10)
        assert b"connection: keep-alive" in _read_response(idle10, bytearray()).lower()
        busy.sendall(b"GET /slow?s=1.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        wait_until(lambda: list(tmp_path.glob("started-*")), 5, message="the slow request in the app")
        appd.proc.terminate()  # TERM: drain
        wait_until(lambda: appd.status()["generations"][0]["workers"][0]["state"] == "stopping", 10,
                   message="the worker to be told to stop")
        idle.settimeout(0.5)
        with pytest.raises(TimeoutError):
            idle.recv(1)  # not closed under the client
        idle.settimeout(10)
        for sock, request in ((idle, GET), (idle10, http10)):
            sock.sendall(request)
            response = _read_response(sock, bytearray())
            assert response.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200")), response
            assert b"connection: close" in response.lower()
            assert sock.recv(1) == b""
        response = _read_response(busy, bytearray())
        assert response.startswith(b"HTTP/1.1 200"), response
        assert b"connection: close" in response.lower()
        wait_until(lambda: appd.proc.poll() is not None, 10, message="daemon exit")
        assert appd.proc.returncode == 0
    finally:
        for sock in (idle, idle10, busy):
            sock.close()


def _command(*argv: str) -> list[str]:
    return ["--worker-class", "command", "--command", " ".join(argv)]


def test_command_worker_gets_listen_fds_and_ready(start_appd):
    appd = start_appd(*_command(PYTHON, "notify_server.py"), "-w", "2", "--ready-delay", "0")
    status, _, body = appd.get("/")
    assert status == 200 and body.startswith(b"command worker v1") and b"fds 1" in body
    assert all(w["state"] == "ready" for w in appd.serving_generation()["workers"])


def test_command_worker_upgrade_under_load_loses_nothing(start_appd):
    appd = start_appd(*_command(PYTHON, "notify_server.py"), "-w", "2", "--ready-delay", "0")
    with Load(appd.address, threads=8) as load:
        code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
        assert code == 0, result
        load.wait_for(50)
    assert not load.failures, load.report()
    bodies = {r.body.split(b" pid")[0] for r in load.results}
    assert bodies == {b"command worker v1", b"command worker v2"}
    assert appd.get("/")[2].startswith(b"command worker v2")


def test_command_that_never_becomes_ready_is_rolled_back(start_appd):
    appd = start_appd(*_command(PYTHON, "notify_server.py"), "-w", "2", "--ready-delay", "0",
                      "--boot-timeout", "2")
    before = appd.serving_generation()
    code, result = appd.ctl_json("upgrade", "--env", "NO_READY=1")
    assert code == 1 and result["error"]["code"] == "rolled_back"
    assert "boot_timeout" in result["error"]["reason"]
    assert appd.serving_generation()["id"] == before["id"]
    assert appd.get("/")[2].startswith(b"command worker v1")


def test_command_that_exits_at_once_is_rolled_back(start_appd):
    appd = start_appd(*_command(PYTHON, "notify_server.py"), "-w", "1", "--ready-delay", "0")
    code, result = appd.ctl_json("upgrade", "--env", "FAIL_AT_START=1")
    assert code == 1 and result["error"]["code"] == "rolled_back", result
    assert "refusing to start, FAIL_AT_START is set" in result["error"]["output"]
    assert appd.get("/")[2].startswith(b"command worker v1")


@pytest.mark.skipif(not shutil.which("uvicorn", path=str(Path(PYTHON).parent)), reason="uvicorn not installed")
def test_uvicorn_asgi_app_survives_upgrade(start_appd):
    """uvicorn on SIGTERM closes connections it accepted but has not read a request
    from yet (its own shutdown; nothing appd can reach), so a request racing the
    old generation's stop can see the connection closed: with a FIN when the request
    had not arrived (RemoteDisconnected), with a RST when its bytes were still unread
    (ConnectionResetError). Never an HTTP error; everything else holds."""
    uvicorn = str(Path(PYTHON).parent / "uvicorn")
    appd = start_appd(*_command(uvicorn, "--fd", "3", "--no-access-log", "asgi_app:app"), "-w", "2",
                      "--ready-delay", "1.5")
    assert appd.get("/")[2].startswith(b"asgi v1")
    with Load(appd.address, threads=4) as load:
        code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
        assert code == 0, result
        load.wait_for(30)
    # At most one racing connection per load thread in each of the 2 old workers.
    assert len(load.failures) <= 4 * 2, load.report()
    closed_unanswered = ("RemoteDisconnected", "ConnectionResetError")
    assert all(f.status is None and any(kind in (f.error or "") for kind in closed_unanswered)
               for f in load.failures), load.report()
    assert appd.get("/")[2].startswith(b"asgi v2")
