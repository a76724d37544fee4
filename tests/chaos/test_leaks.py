"""After 100 upgrades the daemon holds what it held before: the same open
descriptors (± 2), the same threads, RSS within a few MiB; and no process of
its is left anywhere (zombie, orphan under PID 1, stray outside its tree), no
temporary file, no descriptor of a deleted file or memfd."""

from __future__ import annotations

import pytest

from chaos.scenarios import print_leaks, upgrade_leaks

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
