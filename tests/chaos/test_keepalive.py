"""Keep-alive clients, long: persistent connections (16 http.client clients,
POST 100 bytes, 0-20 ms think time, no retries) through a minute of
upgrades, reloads, scale -1/+1 and retires; and 20 upgrades plus 20 reloads
under load through nginx and through HAProxy. Not one request may fail, and
no proxy may answer 5xx. Prints its figures."""

from __future__ import annotations

import os
import time

import pytest

from conftest import wait_until
from loadgen import KeepAliveLoad
from proxies import PROXIES, find, operate_through, running_proxy

SECONDS = float(os.environ.get("APPD_CHAOS_KEEPALIVE_SECONDS", "60"))
GTHREAD = ("keepalive_app:app", "--worker-class", "gthread", "-w", "2", "--threads", "4")
CYCLE = [("upgrade",), ("reload",), ("scale", "-1"), ("scale", "+1"), ("retire", None)]


def run_cycle(appd, seconds: float) -> list[str]:
    done = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        for op in CYCLE:
            if op[0] == "retire":
                op = ("retire", str(appd.serving_generation()["workers"][0]["pid"]))
            result = appd.ctl(*op)
            assert result.returncode == 0, f"{op}: {result.stdout}{result.stderr}"
            done.append(" ".join(op))
    return done


@pytest.mark.timeout(SECONDS + 180)
def test_keepalive_clients_lose_nothing_through_every_operation(start_appd):
    appd = start_appd(*GTHREAD, "--keepalive", "5")
    with KeepAliveLoad(appd.address, clients=16, max_seconds=SECONDS + 120) as load:
        done = run_cycle(appd, SECONDS)
        load.wait_for(100)
    results = load.snapshot()
    kinds = [d.split()[0] for d in done]
    elapsed = max(load.stopped - load.started, 1e-9)
    print(f"\nkeep-alive soak: {len(done)} operations in {SECONDS:.0f} s "
          f"({', '.join(f'{n} {kinds.count(n)}' for n in sorted(set(kinds)))}); "
          f"{len(results)} requests ({len(results) / elapsed:.0f}/s), {len(load.failures)} failed, "
          f"{load.reconnects} reconnects, max latency {load.max_latency * 1000:.0f} ms")
    assert not load.failures, load.report()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", PROXIES)
def test_twenty_upgrades_and_reloads_through_a_proxy_answer_no_5xx(start_appd, tmp_path, name):
    if find(name) is None:
        pytest.skip(f"{name} is not installed (`make chaos` installs it from Debian's packages)")
    appd = start_appd(*GTHREAD, "--keepalive", "75")
    with running_proxy(name, tmp_path, appd.address) as proxy:
        figures = operate_through(appd, proxy.address, upgrades=20, reloads=20, clients=16)
    print(f"\n{name} in front: {figures['operations']} operations in {figures['seconds']:.1f} s, "
          f"{figures['requests']} requests, {figures['5xx']} answered 5xx, "
          f"{len(figures['failures'])} failed, {figures['reconnects']} reconnects")
    assert figures["5xx"] == 0 and not figures["failures"], figures["report"]
    wait_until(lambda: len(appd.status()["generations"]) == 1, 30, message="one generation left")
