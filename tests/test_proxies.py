"""nginx (`upstream { keepalive 16; }`) and HAProxy (`http-reuse always`) in
front of appd gthread workers: keep-alive load through the proxy while
upgrades and reloads alternate, and the proxy answers not one 5xx (it would
on a pooled connection closed under it). A few operations here; `make chaos`
runs 20 upgrades and 20 reloads through each (APPD_PROXY_OPERATIONS=N sets
the count here)."""

from __future__ import annotations

import os

import pytest

from proxies import PROXIES, find, operate_through, running_proxy

OPERATIONS = int(os.environ.get("APPD_PROXY_OPERATIONS", "3"))
# appd keeps idle upstream connections longer than either proxy does, so the
# proxy is the one to close them (the usual advice for any backend).
APPD = ("keepalive_app:app", "--worker-class", "gthread", "-w", "2", "--threads", "4", "--keepalive", "75")


@pytest.mark.parametrize("name", PROXIES)
def test_proxy_answers_no_5xx_through_upgrades_and_reloads(start_appd, tmp_path, name):
    if find(name) is None:
        pytest.skip(f"{name} is not installed (`make test` installs it from Debian's packages)")
    appd = start_appd(*APPD)
    with running_proxy(name, tmp_path, appd.address) as proxy:
        figures = operate_through(appd, proxy.address, upgrades=OPERATIONS, reloads=OPERATIONS)
    print(f"\n{name}: {figures['operations']} operations in {figures['seconds']:.1f} s, {figures['report']}")
    assert figures["5xx"] == 0, figures["report"]
    assert not figures["failures"], figures["report"]
    assert figures["requests"] > 100
