"""Probation and canary upgrades (issue 21): a release that boots but fails on
real traffic is rolled back by itself, with the evidence; the old generation
stands by (probation) or never stops (canary); --hold, promote and rollback
by hand, also across a daemon re-exec."""

from __future__ import annotations

import os
import signal
import textwrap
import threading
from pathlib import Path

import pytest
from conftest import Background, wait_until
from loadgen import KeepAliveLoad, Load
from test_metrics import scrape, total
from test_upgrade import start_myapp, worker_pids, write_app


def write_crashing_app(directory: Path) -> None:
    (directory / "myapp.py").write_text("import os\n\ndef app(environ, start_response):\n    os._exit(1)\n")


def write_failing_app(directory: Path, failing: str) -> None:
    """myapp.py v2: prints a line at import (the evidence's last log lines), then on `/`
    `failing` decides per request n (counted per worker) whether to answer 500."""
    (directory / "myapp.py").write_text(textwrap.dedent(f"""\
        import itertools, os, sys
        print("v2 booting: DATABASE_URL is not set", file=sys.stderr, flush=True)
        counter = itertools.count(1)

        def app(environ, start_response):
            n = next(counter)
            if environ["PATH_INFO"] == "/" and ({failing}):
                start_response("500 Internal Server Error", [("Content-Length", "7")])
                return [b"v2 500\\n"]
            start_response("200 OK", [("Content-Length", "3")])
            return [b"v2\\n"]
        """))


def old_code_failures(load: Load) -> list:
    """Failed requests that the old code (v1) answered or dropped: every failure must be
    a 500 with the new code's body."""
    return [r for r in load.failures if not (r.status == 500 and r.body.startswith(b"v2"))]


def test_probation_rolls_back_a_release_failing_30_percent_to_the_old_code_it_had_loaded(start_appd, tmp_path):
    """The release rewrites myapp.py in place (no `current` symlink): the old generation
    stood by paused with v1 loaded, so the rollback serves v1 from the same worker
    processes (no boot, no re-import). Keep-alive clients (gthread) lose nothing either
    way: cutover hands their idle connections to the new generation, the rollback
    resumes the old one and only then drains the new one, which hands them back."""
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--probation", "20",
                       "--rollback-min-requests", "20", "--worker-class", "gthread", "--threads", "4")
    old = appd.serving_generation()
    write_failing_app(tmp_path, "n % 10 < 3")
    with KeepAliveLoad(appd.address, clients=4) as load:
        code, result = appd.ctl_json("upgrade")
        load.wait_for(20)
    assert code == 1, result
    error = result["error"]
    assert error["code"] == "rolled_back", error
    evidence = error["evidence"]
    assert evidence["requests"] >= 20 and 0.05 < evidence["error_rate"] < 0.6, evidence
    assert evidence["failing_paths"][0][0] == "/" and evidence["failing_statuses"][0][0] == "500", evidence
    assert "DATABASE_URL is not set" in error["output"]
    assert "5xx ratio" in error["reason"]
    serving = appd.serving_generation()
    assert serving["id"] == old["id"] and serving["master_pid"] == old["master_pid"]
    assert worker_pids(serving) == worker_pids(old), "resumed as they were: no worker boot"
    wait_until(lambda: {w["state"] for w in appd.serving_generation()["workers"]} == {"ready"}, 10,
               message="the resumed workers shown ready, not paused")
    assert appd.get("/")[2] == b"v1\n"
    assert not old_code_failures(load), load.report()
    assert appd.status()["last_operation"]["outcome"] == "rolled_back"


def start_v1(start_appd, tmp_path, worker_class: str, *args: str):
    """v1 serving: myapp.py (sync), or tests/apps/asgi_app.py (asgi); returns (appd, the
    `appdctl upgrade` arguments of v2: myapp.py rewritten in place, or APP_VERSION=v2)."""
    if worker_class == "asgi":
        return start_appd("--worker-class", "asgi", "asgi_app:app", *args), ["--env", "APP_VERSION=v2"]
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "--worker-class", worker_class, *args)
    write_app(tmp_path, '"v2"')
    return appd, []


@pytest.mark.parametrize("worker_class", ["sync", "asgi"])
def test_a_paused_generation_takes_no_connection_and_serves_the_backlog_once_resumed(
        start_appd, tmp_path, worker_class):
    """--hold ends a probation with the old generation paused (and so it stays across a
    daemon re-exec). With the new generation's worker stopped (SIGSTOP), a new connection
    waits in the shared backlog: the paused worker does not take it; `appdctl rollback`
    resumes it, and it serves it (v1)."""
    appd, v2 = start_v1(start_appd, tmp_path, worker_class, "-w", "1", "--probation", "0.5",
                        "--metrics-bind", "127.0.0.1:0")
    old = appd.serving_generation()
    code, held = appd.ctl_json("upgrade", "--hold", *v2)
    assert code == 0 and held["outcome"] == "held", held

    def standby():
        return next((g for g in appd.status()["generations"] if g["state"] == "standby"), None)
    wait_until(lambda: [w["state"] for w in (standby() or {}).get("workers", [])] == ["paused"], 10,
               message="the old worker paused")
    assert appd.ctl("upgrade", "--daemon").returncode == 0  # the paused generation survives a re-exec
    assert standby()["workers"][0]["state"] == "paused" and worker_pids(standby()) == worker_pids(old)
    assert total(scrape(appd), "appd_workers", state="paused", generation=str(old["id"])) == 1
    assert all(b"v2" in appd.get("/")[2] for _ in range(10)), "only the new generation accepts"
    new_workers = worker_pids(appd.serving_generation())
    rolled: list = []
    for pid in new_workers:
        os.kill(pid, signal.SIGSTOP)
    try:
        waiting = Background(appd.address, "/")
        waiting.thread.join(1.0)
        assert waiting.thread.is_alive(), f"a paused worker took the connection: {waiting.result}"
        rollback = threading.Thread(target=lambda: rolled.append(appd.ctl_json("rollback")), daemon=True)
        rollback.start()
        assert b"v1" in waiting.join(20)[2]
    finally:
        for pid in new_workers:
            os.kill(pid, signal.SIGCONT)
    rollback.join(60)
    assert rolled and rolled[0][0] == 0 and rolled[0][1]["outcome"] == "rolled_back", rolled
    serving = appd.serving_generation()
    assert serving["id"] == old["id"] and worker_pids(serving) == worker_pids(old)


def test_canary_of_a_crashing_release_is_rolled_back_while_the_old_generation_serves(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--probation", "20")
    old = appd.serving_generation()
    write_crashing_app(tmp_path)
    with Load(appd.address, threads=4) as load:
        result = appd.ctl("upgrade", "--canary", "1")
        load.wait_for(20)
    assert result.returncode == 1, result
    assert "rolled_back" in result.stderr and "crash" in result.stderr
    assert "observed:" in result.stderr  # the evidence, printed for a person
    after = appd.serving_generation()
    assert after["id"] == old["id"] and worker_pids(after) == worker_pids(old)  # never stopped
    assert [g["id"] for g in appd.status()["generations"]] == [old["id"]]
    # The old code failed nothing: only the canary's connections broke, before the rollback.
    wait_until(lambda: appd.get("/")[2] == b"v1\n", 10, message="v1 answers")
    with Load(appd.address, threads=4) as after_load:
        after_load.wait_for(50)
    assert not after_load.failures, after_load.report()


def test_good_release_through_canary_is_promoted(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--probation", "1")
    old = appd.serving_generation()
    write_app(tmp_path, '"v2"')
    with Load(appd.address, threads=4) as load:
        result = appd.ctl("--json", "upgrade", "--canary", "1")
        load.wait_for(20)
    assert result.returncode == 0, result.stdout + result.stderr
    events = [line for line in result.stdout.splitlines() if line.startswith('{"id"')]
    assert any('"event": "canary"' in line and '"requests"' in line for line in events), events
    new = appd.serving_generation()
    assert new["id"] == old["id"] + 1 and new["ready_workers"] == 2
    assert appd.get("/")[2] == b"v2\n"
    assert not load.failures, load.report()


def test_hold_then_rollback_across_a_daemon_reexec_then_hold_then_promote(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2")
    old = appd.serving_generation()
    refused = appd.ctl("upgrade", "--canary", "1")  # probation is 0: nothing would watch it
    assert refused.returncode == 2 and "probation" in refused.stderr
    assert appd.ctl("upgrade", "--canary", "0").returncode == 2
    assert appd.ctl("rollback").returncode == 1  # nothing to roll back
    write_app(tmp_path, '"v2"')
    code, held = appd.ctl_json("upgrade", "--canary", "1", "--hold")
    assert code == 0 and held["outcome"] == "held", held
    assert appd.ctl("upgrade").returncode == 4  # refused while a canary is held
    for _ in range(30):
        appd.get("/")

    def canary():
        return next((g for g in appd.status()["generations"] if g["state"] == "canary"), None)
    wait_until(lambda: (canary() or {}).get("requests"), 10, message="the canary's counts in status")
    shown = appd.ctl("status").stdout  # both generations' request and error counts
    assert f"generation {old['id']} (serving): " in shown and f"generation {held['generation']} (canary): " in shown
    assert appd.ctl("upgrade", "--daemon").returncode == 0
    assert canary()["id"] == held["generation"]  # still held by the re-exec'd daemon
    code, rolled = appd.ctl_json("rollback")
    assert code == 0 and rolled["outcome"] == "rolled_back", rolled
    assert canary() is None and appd.serving_generation()["id"] == old["id"]
    assert appd.ctl("promote").returncode == 1  # nothing left to promote

    code, held = appd.ctl_json("upgrade", "--canary", "1", "--hold")
    assert code == 0, held
    code, promoted = appd.ctl_json("promote")
    assert code == 0 and promoted["generation"] == held["generation"], promoted
    serving = appd.serving_generation()
    assert serving["id"] == held["generation"] and serving["ready_workers"] == 2
    assert appd.get("/")[2] == b"v2\n"
    wait_until(lambda: len(appd.status()["generations"]) == 1, 20, message="the old generation to exit")

