"""Keep-alive clients across every way a gthread worker stops: an idle
connection is handed to the serving workers (its next request runs the new
code, with no close and no reconnect), or, where nobody can take it, its
next request is answered with `Connection: close`. Never closed under the
client. Also: slow request heads hold no thread and get 408."""

from __future__ import annotations

import re
import threading
import time

import pytest

from conftest import wait_until
from helpers import keepalive_soak
from test_metrics import scrape, total
from test_worker_kinds import _connect as connect, _read_response as read_response

GTHREAD = ("keepalive_app:app", "--worker-class", "gthread", "--threads", "2")
ASGI = ("keepalive_app:asgi", "--worker-class", "asgi")
# Long enough that a stop which waited for idle connections instead of handing them on shows.
IDLE = ("--keepalive", "30", "--graceful-timeout", "30")
QUICK_STOP = 15.0  # seconds: well below keepalive/graceful_timeout


def ask(sock, buffer: bytearray, path: str = "/") -> bytes:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return read_response(sock, buffer)


def kept_alive(response: bytes) -> bool:
    return response.startswith(b"HTTP/1.1 200") and b"connection: close" not in response.lower()


def pid_of(response: bytes) -> int:
    return int(response.split(b" pid ")[1].split()[0])


class Clients:
    """A few raw keep-alive connections, each with its read buffer."""

    def __init__(self, address: str, count: int):
        self.socks = [connect(address) for _ in range(count)]
        self.buffers = [bytearray() for _ in self.socks]
        self.pids: list[int] = []  # of the first answer on each connection added with add()

    def add(self, address: str) -> None:
        self.socks.append(connect(address))
        self.buffers.append(bytearray())
        self.pids.append(pid_of(ask(self.socks[-1], self.buffers[-1])))

    def ask_all(self, path: str = "/") -> list[bytes]:
        return [ask(sock, buffer, path) for sock, buffer in zip(self.socks, self.buffers)]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()


@pytest.fixture
def clients():
    made: list[Clients] = []

    def make(address: str, count: int) -> Clients:
        made.append(Clients(address, count))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_upgrade_hands_idle_connections_to_the_new_code(start_appd, clients):
    appd = start_appd(*GTHREAD, "-w", "2", *IDLE, "--metrics-bind", "127.0.0.1:0")
    conns = clients(appd.address, 4)
    assert all(b"v1 gen 1" in r and kept_alive(r) for r in conns.ask_all())
    started = time.monotonic()
    code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
    assert code == 0, result
    assert time.monotonic() - started < QUICK_STOP, "the old generation waited for its idle connections"
    answers = conns.ask_all()
    assert all(kept_alive(r) and b"v2 gen 2" in r for r in answers), answers
    # A sibling not yet told to stop may take some and hand them on again: at least 4.
    handed = re.findall(r"worker_stopped .*generation=1 handed_on=(\d+)", appd.log())
    assert len(handed) == 2 and sum(map(int, handed)) >= 4, appd.log()
    # and counted by the metrics (as connections, not as requests)
    wait_until(lambda: total(scrape(appd), "appd_handed_off_connections_total") >= 4, 20,
               message="the handed-off connections counted")
    assert total(scrape(appd), "appd_requests_total", method="HANDOFF") == 0


def test_the_channel_outlives_a_daemon_reexec(start_appd, clients):
    """Generation 1 got the channel from the first daemon image, generation 2
    from the re-exec'd one: the connection still goes from one to the other."""
    appd = start_appd(*GTHREAD, "-w", "1", *IDLE)
    conns = clients(appd.address, 2)
    assert all(b"gen 1" in r for r in conns.ask_all())
    code, result = appd.ctl_json("upgrade", "--daemon")
    assert code == 0 and result["pid"] == appd.pid, result
    started = time.monotonic()
    code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
    assert code == 0, result
    assert time.monotonic() - started < QUICK_STOP
    answers = conns.ask_all()
    assert all(kept_alive(r) and b"v2 gen 2" in r for r in answers), answers


@pytest.mark.parametrize("worker", [GTHREAD, ASGI], ids=["gthread", "asgi"])
def test_handoff_carries_a_partly_read_pipelined_request(start_appd, clients, worker):
    appd = start_appd(*worker, "-w", "1", *IDLE, "--header-timeout", "60")
    conn = clients(appd.address, 1)
    sock, buffer = conn.socks[0], conn.buffers[0]
    sock.sendall(b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHo")
    first = read_response(sock, buffer)
    assert kept_alive(first) and b"v1 gen 1" in first and b"path /first" in first
    code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
    assert code == 0, result
    sock.sendall(b"st: x\r\n\r\n")
    second = read_response(sock, buffer)
    assert kept_alive(second) and b"v2 gen 2" in second and b"path /second" in second, second


@pytest.mark.parametrize("operation", ["scale", "retire"])
def test_scale_down_and_retire_hand_connections_to_the_other_workers(start_appd, clients, operation):
    appd = start_appd(*GTHREAD, "-w", "2", *IDLE)
    conns = clients(appd.address, 0)
    deadline = time.monotonic() + 10
    # Until both workers hold a connection: the kernel picks who accepts, and on a
    # loaded machine one worker may win many times in a row.
    while len(set(conns.pids)) < 2 and len(conns.pids) < 200 and time.monotonic() < deadline:
        conns.add(appd.address)
    assert len(set(conns.pids)) == 2, conns.pids
    if operation == "scale":
        code, result = appd.ctl_json("scale", "1")
    else:
        code, result = appd.ctl_json("retire", str(conns.pids[0]))
    assert code == 0, result

    def stopped():
        staying = {w["pid"] for w in appd.serving_generation()["workers"] if w["state"] != "stopping"}
        return set(conns.pids) - staying
    gone = stopped()
    assert len(gone) == 1
    wait_until(lambda: gone.isdisjoint(w["pid"] for w in appd.serving_generation()["workers"]),
               QUICK_STOP, message="the stopped worker to exit without waiting for idle connections")
    answers = conns.ask_all()
    assert all(kept_alive(r) for r in answers), answers
    assert gone.isdisjoint(pid_of(r) for r in answers)


def test_recycled_worker_hands_its_connections_on(start_appd, clients):
    appd = start_appd(*GTHREAD, "-w", "1", *IDLE, "--max-requests", "3")
    conn = clients(appd.address, 1)
    answers = [ask(conn.socks[0], conn.buffers[0]) for _ in range(8)]
    assert all(kept_alive(r) for r in answers), answers
    assert len({pid_of(r) for r in answers}) >= 3, "served by successive workers on one connection"


def test_reload_to_sync_workers_answers_the_next_request_with_close(start_appd, clients, tmp_path):
    """Sync workers cannot take a connection: the old worker keeps it and answers
    its next request with `Connection: close` instead of closing it idle."""
    config = tmp_path / "appd.toml"
    config.write_text('worker_class = "gthread"\nthreads = 2\nworkers = 1\nkeepalive = 30\n')
    appd = start_appd("keepalive_app:app", "-c", str(config))
    conn = clients(appd.address, 1)
    old_pid = pid_of(ask(conn.socks[0], conn.buffers[0]))
    config.write_text('worker_class = "sync"\nworkers = 1\nkeepalive = 30\n')
    reload = threading.Thread(target=lambda: appd.ctl("reload"), daemon=True)
    reload.start()
    wait_until(lambda: any(w["pid"] == old_pid and w["state"] == "stopping"
                           for w in appd.serving_generation()["workers"]), 20,
               message="the gthread worker to be told to stop")
    conn.socks[0].settimeout(0.5)
    with pytest.raises(TimeoutError):
        conn.socks[0].recv(1)  # not closed under the client
    conn.socks[0].settimeout(10)
    last = ask(conn.socks[0], conn.buffers[0])
    assert last.startswith(b"HTTP/1.1 200") and b"connection: close" in last.lower()
    assert pid_of(last) == old_pid
    assert conn.socks[0].recv(1) == b""
    reload.join(30)
    assert not reload.is_alive()
    assert appd.get("/")[0] == 200


def test_slow_request_heads_hold_no_thread_and_get_408(start_appd, clients):
    appd = start_appd(*GTHREAD, "-w", "2", "--header-timeout", "3")
    slow = clients(appd.address, 20)
    for sock in slow.socks:
        sock.sendall(b"GET / HTTP/1.1\r\nHo")
    for _ in range(10):
        status, _, body = appd.get("/", timeout=5)
        assert status == 200 and body.startswith(b"v1")
    for sock in slow.socks:
        sock.settimeout(15)
        assert sock.recv(4096).startswith(b"HTTP/1.1 408"), "a head not done in header_timeout"


SOAK_SECONDS = 8.0


def test_keepalive_soak_through_upgrades_and_reloads_loses_nothing(start_appd):
    """16 persistent connections POSTing 100 bytes with 0-20 ms think time, no
    retries, while upgrades and reloads alternate: not one request fails."""
    appd = start_appd(*GTHREAD, "-w", "2", "--threads", "4", "--keepalive", "5")
    operations, load = keepalive_soak(appd, SOAK_SECONDS)
    print(f"\nkeep-alive soak: {len(operations)} operations, {load.report()}")
    assert not load.failures, load.report()
    assert len(operations) >= 4
    assert len(load.results) > 500
