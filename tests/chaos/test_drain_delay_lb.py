"""drain_delay behind HAProxy health-checking /readyz (tests/lb_drain.py):
draining one of two appd instances under load costs the clients nothing with
a drain_delay longer than HAProxy takes to notice, and costs requests without.
Prints its figures."""

from __future__ import annotations

import signal

import pytest

from conftest import wait_until
from lb_drain import drain_one_under_load, haproxy_checking_readyz
from proxies import find

INTER, FALL = 0.2, 2  # HAProxy notices a 503 within 0.4-0.6 s


def metrics_address(appd) -> str:
    return wait_until(lambda: appd.status()["daemon"]["metrics_address"], 20, message="the metrics listener")


def terminate(appd) -> None:
    appd.seen |= appd.descendants()
    appd.proc.send_signal(signal.SIGTERM)
    assert appd.proc.wait(30) == 0


@pytest.mark.skipif(find("haproxy") is None, reason="haproxy is not installed (make proxies)")
@pytest.mark.parametrize("drain_delay", [1.5, 0])
def test_drain_delay_behind_haproxy_checking_readyz(start_appd, tmp_path, drain_delay):
    drained = start_appd("-w", "1", "--metrics-bind", "127.0.0.1:0", "--drain-delay", str(drain_delay))
    staying = start_appd("-w", "1", "--metrics-bind", "127.0.0.1:0")
    upstreams = [(appd.address, metrics_address(appd)) for appd in (drained, staying)]
    with haproxy_checking_readyz(tmp_path, upstreams, inter=INTER, fall=FALL) as proxy:
        figures = drain_one_under_load(proxy.address, drain=lambda: terminate(drained))
    print(f"\ndrain_delay={drain_delay}: {figures}")
    if drain_delay:
        assert figures["errors"] == 0, figures
    else:  # the comparison: the instance stopped before HAProxy noticed
        assert figures["errors"] > 0, figures
