"""After 100 upgrades the daemon holds what it held before: the same open
descriptors (± 2), the same threads, RSS within a few MiB; and no process of
its is left anywhere (zombie, orphan under PID 1, stray outside its tree), no
temporary file, no descriptor of a deleted file or memfd."""

from __future__ import annotations

import pytest

from chaos.scenarios import print_leaks, upgrade_leaks
from chaos.tools import usage
from conftest import wait_until
from helpers import worker_pids
from loadgen import KeepAliveLoad

RSS_SLACK = 4 * 2**20


@pytest.mark.timeout(300)
def test_hundred_upgrades_leak_no_fd_thread_memory_process_or_file(start_appd, tmp_path):
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    appd = start_appd("-w", "2", "--graceful-timeout", "5", env={"TMPDIR": str(private_tmp)})
    figures = upgrade_leaks(appd, upgrades=100)
    print_leaks(figures)
    before, after = figures["before"], figures["after"]

    assert abs(after.fds - before.fds) <= 2, (before.fd_targets, after.fd_targets)
    assert after.threads == before.threads
    assert after.rss - before.rss < RSS_SLACK
    assert figures["leftover"] == [], "masters or workers of old generations still exist"
    assert figures["census"]["zombies"] == [] and figures["census"]["strays"] == []
    assert figures["census"]["orphans"] == []
    assert figures["seen"] >= 100 * 3, "every upgrade replaces a master and its two workers"
    assert figures["new_temp"] == [] and figures["unlinked"] == []
    assert list(private_tmp.iterdir()) == []
    assert appd.get("/")[0] == 200


@pytest.mark.timeout(400)
def test_hundred_upgrades_handing_keepalive_connections_on_leak_no_fd(start_appd, tmp_path):
    """The same with gthread workers and 8 keep-alive clients throughout: every
    upgrade hands their connections to the new generation over the handoff
    channel, and nothing stays behind (the daemon's fds, the workers' fds once
    the clients are gone), and not one request fails."""
    appd = start_appd("keepalive_app:app", "--worker-class", "gthread", "-w", "2", "--threads", "4",
                      "--keepalive", "30", "--graceful-timeout", "5")
    idle_worker_fds = max(usage(pid).fds for pid in worker_pids(appd))
    with KeepAliveLoad(appd.address, clients=8, max_seconds=380) as load:
        figures = upgrade_leaks(appd, upgrades=100)
        load.wait_for(50)
    print_leaks(figures)
    print(f"  keep-alive clients: {load.report()}")
    before, after = figures["before"], figures["after"]
    assert not load.failures, load.report()
    assert load.reconnects <= 8, "connections were handed on, not closed"
    assert abs(after.fds - before.fds) <= 2, (before.fd_targets, after.fd_targets)
    assert figures["leftover"] == [] and figures["census"]["orphans"] == []
    wait_until(lambda: max(usage(pid).fds for pid in worker_pids(appd)) <= idle_worker_fds,
               40, message="the workers to hold no client connection once the clients left")
