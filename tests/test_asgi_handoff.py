"""Keep-alive clients of asgi workers across upgrades and reloads (issues 13
and 17): an idle connection is handed to the serving generation (its next
request runs the new code, kept alive, with no close, no FIN and no
reconnect), with the part of a pipelined request already read; and a
connection moves between gthread and asgi workers in both directions, the
channel's format being the same. Where nobody takes it (sync workers),
the stopping asgi worker answers its next request with close."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from conftest import wait_until
from helpers import keepalive_soak
from test_keepalive import ASGI, IDLE, QUICK_STOP, ask, kept_alive, pid_of
from test_keepalive import clients  # noqa: F401  (fixture)


def no_fin_yet(sock) -> bool:
    """Nothing to read, not even the end of the stream: the connection is open."""
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    finally:
        sock.settimeout(timeout)
    return False


def loop_env(loop: str, tmp_path) -> dict:
    """uvloop (installed, so the default) or asyncio's own loop (uvloop hidden)."""
    if loop == "uvloop":
        return {}
    hidden = tmp_path / "no_uvloop"
    (hidden / "uvloop").mkdir(parents=True)
    (hidden / "uvloop" / "__init__.py").write_text("raise ImportError('hidden for this test')\n")
    return {"PYTHONPATH": str(hidden)}


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_upgrade_hands_idle_asgi_connections_to_the_new_code(start_appd, clients, loop, tmp_path):  # noqa: F811
    """Both loops' transports give the socket up without a shutdown(): no FIN."""
    appd = start_appd(*ASGI, "-w", "2", *IDLE, env=loop_env(loop, tmp_path))
    conns = clients(appd.address, 4)
    assert all(b"v1 gen 1" in r and kept_alive(r) for r in conns.ask_all())
    started = time.monotonic()
    code, result = appd.ctl_json("upgrade", "--env", "APP_VERSION=v2")
    assert code == 0, result
    wait_until(lambda: len(re.findall(r"worker_stopped .*generation=1 ", appd.log())) == 2, QUICK_STOP,
               message="the old workers to stop without waiting for their idle connections")
    assert time.monotonic() - started < QUICK_STOP
    # The old workers are gone and closed their descriptors: the client saw no FIN.
    assert all(no_fin_yet(sock) for sock in conns.socks)
    answers = conns.ask_all()
    assert all(kept_alive(r) and b"v2 gen 2" in r for r in answers), answers
    handed = re.findall(r"worker_stopped .*generation=1 handed_on=(\d+)", appd.log())
    assert sum(map(int, handed)) >= 4, appd.log()


def test_recycled_asgi_worker_hands_its_connection_on(start_appd, clients):  # noqa: F811
    appd = start_appd(*ASGI, "-w", "1", *IDLE, "--max-requests", "3")
    conn = clients(appd.address, 1)
    answers = [ask(conn.socks[0], conn.buffers[0]) for _ in range(8)]
    assert all(kept_alive(r) for r in answers), answers
    assert len({pid_of(r) for r in answers}) >= 3, "served by successive workers on one connection"


def test_connections_move_between_gthread_and_asgi_workers(start_appd, clients, tmp_path):  # noqa: F811
    """A reload that changes worker_class hands connections across, both ways."""
    config = tmp_path / "appd.toml"
    gthread = 'app = "keepalive_app:app"\nworker_class = "gthread"\nthreads = 2\n'
    asgi = 'app = "keepalive_app:asgi"\nworker_class = "asgi"\n'
    common = "workers = 1\nkeepalive = 30\ngraceful_timeout = 30\n"
    config.write_text(gthread + common)
    appd = start_appd("-c", str(config))
    conns = clients(appd.address, 2)
    pids = {pid_of(r) for r in conns.ask_all()}
    for body in (asgi, gthread):
        config.write_text(body + common)
        started = time.monotonic()
        result = appd.ctl("reload")
        assert result.returncode == 0, result.stdout + result.stderr
        assert time.monotonic() - started < QUICK_STOP, "the old worker waited for its idle connections"
        answers = conns.ask_all()
        assert all(kept_alive(r) for r in answers), answers
        now = {pid_of(r) for r in answers}
        assert len(now) == 1 and now.isdisjoint(pids), (now, pids)
        pids |= now


def test_reload_from_asgi_to_sync_answers_the_next_request_with_close(start_appd, clients, tmp_path):  # noqa: F811
    """Sync workers take no connection: the stopping asgi worker keeps it open
    (not closed under the client) and answers its next request with close."""
    config = tmp_path / "appd.toml"
    config.write_text('app = "keepalive_app:asgi"\nworker_class = "asgi"\nworkers = 1\nkeepalive = 30\n')
    appd = start_appd("-c", str(config))
    conn = clients(appd.address, 1)
    old_pid = pid_of(ask(conn.socks[0], conn.buffers[0]))
    config.write_text('app = "keepalive_app:app"\nworker_class = "sync"\nworkers = 1\nkeepalive = 30\n')
    reload = threading.Thread(target=lambda: appd.ctl("reload"), daemon=True)
    reload.start()
    wait_until(lambda: any(w["pid"] == old_pid and w["state"] == "stopping"
                           for w in appd.serving_generation()["workers"]), 20,
               message="the asgi worker to be told to stop")
    assert no_fin_yet(conn.socks[0])
    last = ask(conn.socks[0], conn.buffers[0])
    assert last.startswith(b"HTTP/1.1 200") and b"connection: close" in last.lower()
    assert pid_of(last) == old_pid
    conn.socks[0].settimeout(10)
    assert conn.socks[0].recv(1) == b""
    reload.join(30)
    assert not reload.is_alive()


SOAK_SECONDS = 6.0


def test_asgi_keepalive_soak_through_upgrades_and_reloads_loses_nothing(start_appd):
    appd = start_appd(*ASGI, "-w", "2", "--keepalive", "5")
    operations, load = keepalive_soak(appd, SOAK_SECONDS)
    print(f"\nasgi keep-alive soak: {len(operations)} operations, {load.report()}")
    assert not load.failures, load.report()
    assert len(operations) >= 4
    assert len(load.results) > 300
