"""Reliability, in the time `make test` allows: crash loops back off and say
so, a SIGKILLed daemon takes its tree down and restarts on the same paths,
hung orphans are killed, the process tree reads right in `ps`, and short
versions of the chaos suite (tests/chaos/, `make chaos`): upgrades that leak
nothing, control-socket abuse, and a soak of random faults under load."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest

from chaos.scenarios import (chaos_seed, control_abuse, generation_pids, print_abuse, print_leaks, soak,
                             upgrade_leaks, unexpected)
from chaos.tools import still_there, titles, tree
from conftest import APPS, Appd, Background, assert_no_leftovers, http_get, wait_until
from helpers import reaping_orphans

GRACEFUL = 3


@pytest.fixture
def state(tmp_path):
    """The directory steering tests/apps/reliability_app.py."""
    directory = tmp_path / "state"
    directory.mkdir()
    return directory


def busy(state) -> list:
    return list(state.glob("busy-*"))


# --- crash recovery ---

def test_master_crash_loop_backs_off_reports_crashlooping_and_upgrade_recovers(start_appd, state):
    appd = start_appd("reliability_app:app", "--preload-app", "-w", "2",
                      env={"RELIABILITY_STATE": str(state)})
    before = appd.status()
    first = before["generations"][0]
    (state / "fail").touch()  # from now on every new master dies importing the app
    os.kill(first["master_pid"], signal.SIGKILL)

    def looping():
        status = appd.status()
        return status if status["daemon"]["state"] == "crashlooping" and len(status["crashes"]) >= 4 else None

    status = wait_until(looping, 20, message="four crashes and state crashlooping")
    crashes = status["crashes"][:4]
    assert [c["generation"] for c in crashes] == [first["id"] + n for n in range(4)]
    assert crashes[0]["status"] == "killed by SIGKILL"
    for crash in crashes[1:]:
        assert crash["status"] == "exit code 1"
        assert "refusing to start" in crash["output"], crash
    gaps = [later["at"] - earlier["at"] for earlier, later in zip(crashes, crashes[1:])]
    print(f"\ncrash loop: gaps between crashes {', '.join(f'{g:.2f} s' for g in gaps)}")
    assert gaps[0] < gaps[1] < gaps[2], gaps
    assert gaps[1] >= 1.0 and gaps[2] >= 2.0, f"restarts must back off: {gaps}"
    assert not [g for g in status["generations"] if g["state"] == "serving"]
    assert status["listeners"] == before["listeners"], "the daemon keeps its listeners"
    assert status["daemon"]["pid"] == appd.pid and appd.proc.poll() is None
    assert "crashlooping" in appd.ctl("status").stdout

    # A request arriving now waits in the listener's backlog and is served after recovery.
    waiting = Background(appd.address, "/", timeout=30)
    (state / "fail").unlink()
    code, result = appd.ctl_json("upgrade")
    assert code == 0, result
    status = appd.status()
    assert status["daemon"]["state"] == "running"
    serving = appd.serving_generation()
    assert serving["id"] == result["generation"] and serving["id"] > crashes[-1]["generation"]
    assert status["listeners"] == before["listeners"]
    assert waiting.join()[0] == 200
    assert appd.get("/")[0] == 200


def test_sigkilled_daemon_stops_its_tree_within_graceful_timeout_and_restarts_on_same_paths(
        start_appd, state):
    http_sock = state.parent / "http.sock"
    appd_http = f"unix:{http_sock}"
    args = ["reliability_app:app", "--bind", appd_http, "-w", "2", "--graceful-timeout", str(GRACEFUL)]
    env = {"RELIABILITY_STATE": str(state)}
    appd = start_appd(*args, env=env)
    pids = generation_pids(appd.status())
    slow = Background(appd_http, "/slow?s=30")
    wait_until(lambda: busy(state), 10, message="the slow request to be in flight")

    with reaping_orphans() as reap:
        appd.proc.kill()
        killed = time.monotonic()
        appd.proc.wait(5)
        wait_until(lambda: (reap(pids), not still_there(pids))[1], GRACEFUL + 5,
                   message="the masters and workers to exit")
        took = time.monotonic() - killed
    print(f"\ndaemon SIGKILLed: its {len(pids)} masters and workers were gone {took:.2f} s later "
          f"(graceful_timeout {GRACEFUL} s, one request in flight)")
    assert took < GRACEFUL + 1.5
    assert isinstance(slow.join(), Exception), "a request longer than graceful_timeout is cut"
    assert http_sock.is_socket() and os.path.exists(appd.socket), "the stale socket files are still there"

    # Same control socket, same unix listener: no cleanup needed.
    restarted = Appd(appd.tmp, args, env, APPS)
    try:
        restarted.wait_ready()
        status = restarted.status()
        assert status["daemon"]["pid"] == restarted.pid and status["daemon"]["socket"] == appd.socket
        assert status["listeners"][0]["address"] == appd_http
        assert http_get(appd_http, "/")[0] == 200
    finally:
        restarted.stop()
        assert_no_leftovers(restarted.seen | {restarted.pid})


def test_hung_worker_of_a_sigkilled_master_is_killed_by_the_daemon(start_appd):
    """A stopped worker cannot act on the SIGTERM its master's death sends it;
    the daemon (its subreaper) kills it graceful_timeout + 1 s later."""
    appd = start_appd("-w", "2", "--graceful-timeout", "2")
    generation = appd.serving_generation()
    hung = generation["workers"][0]["pid"]
    os.kill(hung, signal.SIGSTOP)
    os.kill(generation["master_pid"], signal.SIGKILL)
    wait_until(lambda: not still_there([hung]), 2 + 1 + 5, message="the hung orphan to be killed and reaped")
    wait_until(lambda: appd.serving_generation()["id"] > generation["id"], 10,
               message="a new generation to serve")
    assert "stragglers_killed" in appd.log()
    assert appd.get("/")[0] == 200


# --- process titles ---

def test_process_tree_during_an_upgrade_reads_right_in_ps(start_appd, state):
    appd = start_appd("reliability_app:app", "-w", "2", env={"RELIABILITY_STATE": str(state)})
    slow = Background(appd.address, "/slow?s=4")
    wait_until(lambda: busy(state), 10, message="a request in flight on generation 1")
    assert appd.call("upgrade", wait=False)["outcome"] == "started"

    def draining_with_one_worker():
        status = appd.status()
        states = {g["id"]: (g["state"], len(g["workers"])) for g in status["generations"]}
        return status if states == {1: ("draining", 1), 2: ("serving", 2)} else None

    status = wait_until(draining_with_one_worker, 10, message="generation 2 serving, 1 draining its last worker")
    root = psutil.Process(appd.pid)
    everyone = titles(p.pid for p in tree(appd.pid))
    masters = {g["master_pid"]: g for g in status["generations"]}
    assert [t for t in everyone.values() if t.startswith("appd: daemon")] == [everyone[appd.pid]]
    assert {c.pid for c in root.children()} == set(masters)
    for pid, generation in masters.items():
        assert everyone[pid] == f"appd: master gen {generation['id']}"
        workers = {c.pid for c in psutil.Process(pid).children()}
        assert workers == {w["pid"] for w in generation["workers"]}
        assert {everyone[w] for w in workers} == {f"appd: worker gen {generation['id']}"}
    print("\n" + "\n".join(f"  {pid:>7}  {title}" for pid, title in sorted(everyone.items())))

    assert slow.join()[0] == 200
    wait_until(lambda: [g["id"] for g in appd.status()["generations"]] == [2], 10,
               message="generation 1 to exit")
    assert sorted(titles(p.pid for p in tree(appd.pid)).values()) == [
        "appd: daemon", "appd: master gen 2", "appd: worker gen 2", "appd: worker gen 2"]


# --- short versions of the chaos suite ---

def test_fifteen_upgrades_leak_no_fd_thread_memory_process_or_file(start_appd, tmp_path):
    private_tmp = tmp_path / "tmpdir"
    private_tmp.mkdir()
    appd = start_appd("-w", "2", env={"TMPDIR": str(private_tmp)})
    figures = upgrade_leaks(appd, upgrades=15, warmup=2)
    print_leaks(figures)
    before, after = figures["before"], figures["after"]
    assert abs(after.fds - before.fds) <= 2, (before.fd_targets, after.fd_targets)
    assert after.threads == before.threads
    assert after.rss - before.rss < 4 * 2**20
    assert figures["leftover"] == [] and figures["census"]["zombies"] == []
    assert figures["census"]["strays"] == [] and figures["census"]["orphans"] == []
    assert figures["new_temp"] == [] and figures["unlinked"] == []
    assert list(private_tmp.iterdir()) == []


def test_control_socket_abuse_short(start_appd):
    appd = start_appd("-w", "2")
    seed = chaos_seed()
    print(f"\nAPPD_CHAOS_SEED={seed}")
    figures = control_abuse(appd, seed, frames=2_000, drops=200)
    print_abuse(figures)
    stats, probe = figures["stats"], figures["probe"]
    assert sum(v for k, v in stats.items() if k.startswith("frame:")) == 2_000
    assert not unexpected(stats), stats
    assert not probe.errors and probe.percentile(0.99) < 0.050, probe.summary()
    up, down = figures["scaled"]
    assert (up["result"]["target"], up["ready"], down["result"]["target"], down["ready"]) == (3, 3, 2, 2)
    assert figures["final"]["generations"][0]["id"] == figures["generation"]
    assert appd.get("/")[0] == 200
    assert abs(figures["after"].fds - figures["before"].fds) <= 2


@pytest.mark.timeout(90)
def test_short_soak_loses_only_requests_in_flight_on_killed_processes(start_appd):
    appd = start_appd("-w", "3", "--timeout", "2", "--graceful-timeout", str(GRACEFUL))
    seed = chaos_seed()
    print(f"\nAPPD_CHAOS_SEED={seed}")
    figures = soak(appd, seed, seconds=10, timeout=2, graceful_timeout=GRACEFUL)
    print(figures["report"])
    accounting = figures["accounting"]
    assert not accounting["unexplained"], "failed requests not in flight on a killed process"
    assert not accounting["unexplained_ops"], "operations failed with no fault to blame"
    assert len(accounting["results"]) > 100
    assert figures["leftover"] == [] and figures["census"]["strays"] == []
