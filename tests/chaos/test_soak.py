"""The soak: under continuous load, faults and operations interleave at random
(one printed seed replays the choices): SIGKILL of a worker, SIGKILL of a
master, SIGSTOP of a worker (hung: killed after `timeout`), control-socket
garbage; and upgrade, reload, scale up and down, retire.

Every request is counted. A failed request must have been in flight on a
process a fault killed, within that fault's budget (one per sync worker
killed or hung, one per worker of a killed master); none may be due to an
operation or to garbage. An operation may fail only when a fault hit it.
Afterwards the service settles to one generation and no process is left."""

from __future__ import annotations

import os

import pytest

from chaos.scenarios import chaos_seed, soak

SECONDS = float(os.environ.get("APPD_CHAOS_SECONDS", "150"))
TIMEOUT, GRACEFUL = 2, 5


@pytest.mark.timeout(SECONDS + 240)
def test_soak_loses_only_requests_in_flight_on_killed_processes(start_appd):
    appd = start_appd("-w", "3", "--timeout", str(TIMEOUT), "--graceful-timeout", str(GRACEFUL))
    seed = chaos_seed()
    print(f"\nAPPD_CHAOS_SEED={seed}  APPD_CHAOS_SECONDS={SECONDS:.0f}")
    figures = soak(appd, seed, SECONDS, TIMEOUT, GRACEFUL)
    print(figures["report"])
    driver, accounting = figures["driver"], figures["accounting"]

    kinds = {f.kind for f in driver.faults}
    assert {"kill_worker", "stop_worker", "garbage"} <= kinds, kinds
    assert {op.kind for op in driver.operations} == {"upgrade", "reload", "scale", "retire"}
    assert not accounting["unexplained"], "failed requests not in flight on a killed process"
    assert not accounting["unexplained_ops"], "operations failed with no fault to blame"
    assert len(accounting["results"]) > 1000
    assert figures["leftover"] == [] and figures["census"]["zombies"] == []
    assert figures["census"]["strays"] == []
    assert abs(figures["after"].fds - figures["before"].fds) <= 2, (figures["before"].fd_targets,
                                                                    figures["after"].fd_targets)
    assert figures["after"].threads == figures["before"].threads
    assert appd.get("/")[0] == 200
