"""upgrade: a new generation from a fresh exec picks up new code, a new
interpreter and a new release directory; every kind of broken deploy rolls
back while the old generation answers every request; one upgrade at a time;
no request waits for the new code to import."""

from __future__ import annotations


import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from conftest import APPDCTL, wait_until
from helpers import worker_pids
from loadgen import Load

# Rewritten app files are often the same size and written within the same
# second: without this a stale .pyc would be imported.
NO_PYC = {"PYTHONDONTWRITEBYTECODE": "1"}


def write_app(directory: Path, body: str = '"v1"', prelude: str = "", healthz: str = "200 OK") -> None:
    """Write myapp.py: `/` answers the Python expression `body`, `/healthz` the
    status `healthz`; `prelude` runs at import."""
    (directory / "myapp.py").write_text(textwrap.dedent(f"""\
        import os, sys, time
        {textwrap.indent(textwrap.dedent(prelude), " " * 8).strip()}

        def app(environ, start_response):
            status = {healthz!r} if environ["PATH_INFO"] == "/healthz" else "200 OK"
            data = (str({body}) + "\\n").encode()
            start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
            return [data]
        """))


def start_myapp(start_appd, directory: Path, *args: str, env: dict | None = None):
    return start_appd("--chdir", str(directory), "myapp:app", *args, env={**NO_PYC, **(env or {})})


def test_upgrade_serves_new_code_without_failing_a_request(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2")
    assert appd.get("/")[2] == b"v1\n"
    before = appd.serving_generation()
    write_app(tmp_path, '"v2"')
    with Load(appd.address, threads=8) as load:
        code, result = appd.ctl_json("upgrade")
        load.wait_for(50)
    assert code == 0, result
    assert result["generation"] == before["id"] + 1
    assert appd.get("/")[2] == b"v2\n"
    assert not load.failures, load.report()
    bodies = {r.body for r in load.results}
    assert bodies == {b"v1\n", b"v2\n"}, "the load should span the cutover"
    status = appd.status()
    assert [g["id"] for g in status["generations"]] == [before["id"] + 1]
    assert status["last_operation"]["op"] == "upgrade" and status["last_operation"]["outcome"] == "done"


# --- broken deploys: each rolls back and the old generation never misses a request ---

def exit_states(appd) -> dict[int, str]:
    """generation id → the state the daemon logged when that generation exited."""
    return {int(m["generation"]): m["state"] for m in re.finditer(
        r"generation_exited\s.*?generation=(?P<generation>\d+).*?state=(?P<state>\w+)", appd.log())}


def assert_rolls_back(appd, *upgrade_args: str) -> tuple[dict, float]:
    """Upgrade under load; check the rollback contract; return (error, seconds).

    Workers of a booting generation accept only at cutover (SERVE=1), so no
    worker of a generation that rolls back ever answers, even one that booted."""
    before = appd.serving_generation()
    with Load(appd.address, threads=8) as load:
        started = time.monotonic()
        code, reply = appd.ctl_json("upgrade", *upgrade_args)
        seconds = time.monotonic() - started
        load.wait_for(50)  # the old generation still answers after the rollback
    assert code == 1, reply
    error = reply["error"]
    assert error["code"] == "rolled_back", error
    assert not load.failures, load.report()
    answered_by = {r.body for r in load.results}
    after = {r.body for r in load.results if r.started > started + seconds}
    assert after == {b"v1\n"}, "only the old generation answers after the rollback"
    assert answered_by == {b"v1\n"}, "no worker of the broken generation may answer"
    status = appd.status()
    serving = [g for g in status["generations"] if g["state"] == "serving"]
    assert [g["id"] for g in serving] == [before["id"]]
    assert worker_pids(serving[0]) == worker_pids(before), "the old generation is left untouched"
    last = status["last_operation"]
    assert last["op"] == "upgrade" and last["outcome"] == "rolled_back" and not last["ok"], last
    wait_until(lambda: [g["id"] for g in appd.status()["generations"]] == [before["id"]], 10,
               message="only the old generation left")
    assert appd.get("/")[2] == b"v1\n"
    # The lifecycle's `starting → failed`: the rolled-back generation ends as failed, not exited.
    broken = before["id"] + 1
    wait_until(lambda: broken in exit_states(appd), 10, message="the rolled-back generation's exit logged")
    assert exit_states(appd)[broken] == "failed", exit_states(appd)
    print(f"rolled back in {seconds:.2f} s: {error['reason']}; load: {load.report()}")
    return error, seconds


def test_app_that_fails_to_import_rolls_back(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2")
    write_app(tmp_path, '"v2"', prelude='raise RuntimeError("deploy 2 is broken")')
    error, _ = assert_rolls_back(appd)
    assert "failed to boot" in error["reason"] and "deploy 2 is broken" in error["reason"], error
    assert "Traceback" in error["output"] and "RuntimeError: deploy 2 is broken" in error["output"]


def test_one_worker_failing_at_boot_rolls_back(start_appd, tmp_path):
    """The new code fails in exactly one worker: the second one to claim a slot file."""
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "3")
    slots = tmp_path / "slots"
    slots.mkdir()
    write_app(tmp_path, '"v2"', prelude=f"""
        for slot in range(100):
            try:
                os.close(os.open(os.path.join({str(slots)!r}, str(slot)), os.O_CREAT | os.O_EXCL))
                break
            except FileExistsError:
                pass
        if slot == 1:
            raise RuntimeError("worker in slot 1 refuses to boot")
        """)
    error, _ = assert_rolls_back(appd)
    assert "failed to boot" in error["reason"] and "slot 1 refuses" in error["reason"], error
    assert "Traceback" in error["output"]
    assert "RuntimeError: worker in slot 1 refuses to boot" in error["output"]
    assert (slots / "0").exists() and (slots / "1").exists()


def test_new_master_exiting_rolls_back(start_appd, tmp_path):
    """With preload_app the master imports the app; APP_MASTER_EXIT (given only to
    the new generation with --env) makes that import end the master."""
    write_app(tmp_path, '"v1"', prelude="""
        if os.environ.get("APP_MASTER_EXIT"):
            print("master of generation", os.environ["APPD_GENERATION"], "exits on purpose", flush=True)
            os._exit(17)
        """)
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--preload-app")
    error, _ = assert_rolls_back(appd, "--env", "APP_MASTER_EXIT=1")
    assert "exited" in error["reason"] and "17" in error["reason"], error
    assert "master of generation 2 exits on purpose" in error["output"]


def test_failing_ready_check_rolls_back(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--ready-check", "/healthz")
    write_app(tmp_path, '"v2"', healthz="503 Service Unavailable")
    error, _ = assert_rolls_back(appd)
    assert "ready_check GET /healthz answered '503 Service Unavailable'" in error["reason"], error
    assert "Traceback" in error["output"] and "/healthz" in error["output"], error


def test_not_ready_within_boot_timeout_rolls_back_quickly(start_appd, tmp_path):
    write_app(tmp_path, '"v1"')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--boot-timeout", "4")
    old = appd.serving_generation()
    write_app(tmp_path, '"v2"', prelude="time.sleep(30)")
    error, seconds = assert_rolls_back(appd)
    assert "boot_timeout" in error["reason"], error
    assert seconds < 10, f"rollback took {seconds:.1f} s"
    # The slow generation's master and workers are gone: only the old one is left.
    wait_until(lambda: appd.descendants() == {old["master_pid"]} | worker_pids(old), 5,
               message="the slow generation's processes to be gone")


# --- re-resolving python and chdir ---

def test_upgrade_reresolves_python_symlink(start_appd, tmp_path):
    """`python` names a symlink; swapping it makes the next generation run the new target."""
    for marker in ("a", "b"):
        wrapper = tmp_path / f"python-{marker}"
        wrapper.write_text(f'#!/bin/sh\nPY_MARKER={marker} exec {sys.executable} "$@"\n')
        wrapper.chmod(0o755)
    link = tmp_path / "python"
    link.symlink_to(tmp_path / "python-a")
    write_app(tmp_path, '"python " + os.environ.get("PY_MARKER", "none")')
    appd = start_myapp(start_appd, tmp_path, "-w", "2", "--python", str(link))
    assert appd.get("/")[2] == b"python a\n"
    swap = tmp_path / "python.new"
    swap.symlink_to(tmp_path / "python-b")
    os.replace(swap, link)
    code, result = appd.ctl_json("upgrade")
    assert code == 0, result
    assert appd.get("/")[2] == b"python b\n"


def test_upgrade_follows_current_release_symlink(start_appd, tmp_path):
    releases = tmp_path / "releases"
    for number in (1, 2):
        (releases / str(number)).mkdir(parents=True)
        write_app(releases / str(number), f'"release {number}"')
    current = tmp_path / "current"
    current.symlink_to(releases / "1")
    appd = start_myapp(start_appd, current, "-w", "2")
    assert appd.get("/")[2] == b"release 1\n"
    swap = tmp_path / "current.new"
    swap.symlink_to(releases / "2")
    os.replace(swap, current)
    with Load(appd.address, threads=8) as load:
        code, result = appd.ctl_json("upgrade")
    assert code == 0, result
    assert appd.get("/")[2] == b"release 2\n"
    assert not load.failures, load.report()


# --- one operation at a time, and no request waits for the app to import ---

def test_two_concurrent_upgrades_one_is_refused_busy(start_appd):
    appd = start_appd("slow_import:app", "-w", "2", env={"APP_IMPORT_SECONDS": "2"})
    upgrades = [subprocess.Popen([APPDCTL, "--socket", appd.socket, "--json", "upgrade"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    try:
        # status answers, quickly, while an upgrade is running.
        def upgrade_running():
            started = time.monotonic()
            status = appd.status()
            assert time.monotonic() - started < 1.0, "status was slow during an upgrade"
            return status["operation"] == "upgrade"
        wait_until(upgrade_running, 5, message="status to show the running upgrade")
        outputs = [p.communicate(timeout=30) for p in upgrades]
    finally:
        for p in upgrades:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = sorted(p.returncode for p in upgrades)
    assert codes == [0, 4], (codes, outputs)
    refused = outputs[[p.returncode for p in upgrades].index(4)][0]
    assert '"code": "busy"' in refused, refused
    assert appd.serving_generation()["id"] == 2


def test_upgrade_of_slow_importing_app_keeps_latency_low(start_appd):
    """The new generation imports for 2 s while the old one keeps answering: no
    request waits for the import (the core promise; measured, asserted generously)."""
    appd = start_appd("slow_import:app", "-w", "2", env={"APP_IMPORT_SECONDS": "2"})
    with Load(appd.address, threads=8) as load:
        started = time.monotonic()
        code, result = appd.ctl_json("upgrade")
        ended = time.monotonic()
        load.wait_for(50)
    assert code == 0, result
    assert ended - started >= 2.0, "the upgrade should have waited for the 2-s import"
    during = load.between(started, ended)
    worst = max(r.latency for r in during)
    print(f"upgrade of the 2-s app took {ended - started:.2f} s; {len(during)} requests during it, "
          f"max latency {worst * 1000:.0f} ms; overall {load.report()}")
    assert not load.failures, load.report()
    assert worst < 1.5, f"a request waited {worst:.2f} s during the upgrade"
