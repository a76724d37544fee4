"""appdctl, the operator's client: every command through the real CLI against a
real `appd start`, with the contract's exit codes (0 ok, 1 failed or rolled
back, 2 usage, 3 unreachable, 4 refused), the --json fields, the Python API,
and what appdctl imports (its start-up time is measured by `make bench`, scenario ctl).

After every command that talks to the daemon, the daemon still answers
`status` and the service still answers HTTP 200 (unless the command was meant
to stop it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import APPDCTL, running_appd, wait_until
from helpers import assert_healthy, worker_pids

PY = sys.executable


def write_app(directory, name: str, source: str) -> None:
    (directory / f"{name}.py").write_text(textwrap.dedent(source))


ENV_ECHO_APP = """
    import os

    def app(environ, start_response):
        body = ("K=" + os.environ.get("K", "<unset>") + "\\n").encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
"""


def wait_idle(appd, timeout: float = 20.0) -> dict:
    """Until no changing operation runs (e.g. after --no-wait or a client timeout)."""
    return wait_until(lambda: (s := appd.status())["operation"] is None and s, timeout,
                      message="the running operation to finish")


@pytest.fixture(scope="module")
def idle_appd(tmp_path_factory):
    """One daemon for the tests that only ask it things or are refused (nothing
    changes it); each still checks it is healthy afterwards."""
    with running_appd(tmp_path_factory.mktemp("appdctl"), "-w", "1", "--max-workers", "3") as appd:
        yield appd


# --- status and ping ---

def test_status_prints_a_table_of_generations_and_workers(start_appd):
    appd = start_appd("-w", "2")
    status = appd.status()
    result = appd.ctl("status")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"pid {appd.pid}" in out
    assert status["listeners"][0]["address"] in out
    header = next(line for line in out.splitlines() if line.startswith("GEN"))
    for column in ("STATE", "MASTER", "WORKER", "AGE", "REQS", "RSS", "CPU"):
        assert column in header
    for pid in worker_pids(status):
        assert str(pid) in out
    assert "serving" in out
    assert_healthy(appd)


def test_status_json_has_every_contract_field(start_appd):
    appd = start_appd("-w", "2")
    appd.get("/")

    def counted():  # workers report their request counts to the master, then to the daemon
        code, status = appd.ctl_json("status")
        assert code == 0
        return status if sum(w["requests"] for g in status["generations"] for w in g["workers"]) else None
    status = wait_until(counted, 10, interval=0.2, message="the request to be counted in status")
    daemon = status["daemon"]
    assert daemon["pid"] == appd.pid
    assert isinstance(daemon["version"], str) and daemon["version"]
    assert isinstance(daemon["uptime_s"], (int, float)) and daemon["uptime_s"] >= 0
    assert daemon["socket"] == appd.socket
    assert status["target_workers"] == 2
    [listener] = status["listeners"]
    assert listener["name"] and isinstance(listener["fd"], int)
    assert listener["address"].startswith("127.0.0.1:")
    [generation] = status["generations"]
    assert generation["id"] == 1 and generation["state"] == "serving"
    assert isinstance(generation["master_pid"], int) and isinstance(generation["started_at"], (int, float))
    assert abs(generation["started_at"] - time.time()) < 120
    assert len(generation["workers"]) == 2
    for worker in generation["workers"]:
        assert set(worker) >= {"pid", "state", "age", "requests", "rss_bytes", "cpu_percent"}
        assert worker["rss_bytes"] > 1_000_000  # a real psutil figure, not a placeholder
        assert isinstance(worker["cpu_percent"], (int, float))
    assert sum(w["requests"] for w in generation["workers"]) == 1
    last = status["last_operation"]
    assert set(last) >= {"op", "ok", "outcome", "error", "duration_s"}
    assert last["ok"] is True and last["error"] is None
    assert_healthy(appd)


def test_ping_answers_with_the_daemon_pid(idle_appd):
    appd = idle_appd
    result = appd.ctl("ping")
    assert result.returncode == 0, result.stderr
    assert str(appd.pid) in result.stdout
    code, pong = appd.ctl_json("ping")
    assert code == 0 and pong["pid"] == appd.pid
    assert_healthy(appd)


def test_appd_socket_environment_variable_selects_the_socket(idle_appd):
    appd = idle_appd
    env = {**os.environ, "APPD_SOCKET": appd.socket}
    result = subprocess.run([APPDCTL, "--json", "ping"], capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == appd.pid
    # --socket wins over the variable.
    env["APPD_SOCKET"] = str(appd.tmp / "nothing-here.sock")
    result = subprocess.run([APPDCTL, "--socket", appd.socket, "ping"], capture_output=True, text=True,
                            env=env, timeout=30)
    assert result.returncode == 0, result.stderr
    assert_healthy(appd)


def test_a_closed_output_pipe_costs_the_output_never_the_exit_code(start_appd):
    """`appdctl upgrade | head -1`: the reader goes away, the operation's outcome stays."""
    appd = start_appd()
    # stdout is a pipe whose read end is already closed.
    for args, expected in ((["status"], 0), (["--json", "status"], 0), (["scale", "0"], 2),
                           (["upgrade"], 0)):
        read_end, write_end = os.pipe()
        os.close(read_end)
        try:
            result = subprocess.run([APPDCTL, "--socket", appd.socket, *args], stdout=write_end,
                                    stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(write_end)
        assert result.returncode == expected and "Traceback" not in result.stderr, (args, result.stderr)
    assert appd.serving_generation()["id"] == 2  # the upgrade ran to its end
    assert_healthy(appd)


def test_client_options_work_after_the_command_too(start_appd):
    appd = start_appd()
    result = subprocess.run([APPDCTL, "ping", "--socket", appd.socket, "--json", "--timeout", "5"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["pid"] == appd.pid
    # An option given before the command is not reset by the command's own parser.
    result = subprocess.run([APPDCTL, "--json", "status", "--socket", appd.socket],
                            capture_output=True, text=True, timeout=30)
    assert json.loads(result.stdout)["daemon"]["pid"] == appd.pid
    # drain keeps its own --timeout (the drain's time) beside the client options.
    result = subprocess.run([APPDCTL, "drain", "--socket", appd.socket, "--timeout", "5", "--json"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert appd.proc.wait(15) == 0


# --- reload and upgrade ---

def test_reload_replaces_every_worker_and_exits_0(start_appd):
    appd = start_appd("-w", "2")
    before = worker_pids(appd.status())
    code, result = appd.ctl_json("reload")
    assert code == 0, result
    assert result["outcome"] == "done"
    after = worker_pids(assert_healthy(appd))
    assert len(after) == 2 and not after & before


def test_upgrade_starts_a_new_generation_and_exits_0(start_appd):
    appd = start_appd("-w", "2")
    first = appd.serving_generation()
    code, result = appd.ctl_json("upgrade")
    assert code == 0, result
    assert result["generation"] == first["id"] + 1
    status = assert_healthy(appd)
    assert [g["id"] for g in status["generations"]] == [first["id"] + 1]
    assert status["last_operation"]["op"] == "upgrade" and status["last_operation"]["ok"] is True


def test_upgrade_of_a_broken_deploy_rolls_back_with_exit_1(start_appd, tmp_path):
    write_app(tmp_path, "deploy", ENV_ECHO_APP)
    appd = start_appd("--chdir", str(tmp_path), "deploy:app", env={"PYTHONDONTWRITEBYTECODE": "1"})
    serving = appd.serving_generation()
    write_app(tmp_path, "deploy", """
        raise ImportError("deploy 42 is broken on purpose")
    """)
    result = appd.ctl("upgrade")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "rolled_back" in result.stderr
    assert "deploy 42 is broken on purpose" in result.stderr  # the new generation's traceback
    code, error = appd.ctl_json("upgrade")
    assert code == 1
    assert error["ok"] is False and error["error"]["code"] == "rolled_back"
    assert "deploy 42 is broken on purpose" in error["error"]["output"]
    status = assert_healthy(appd)
    assert appd.serving_generation()["master_pid"] == serving["master_pid"]
    assert status["last_operation"]["outcome"] == "rolled_back" and status["last_operation"]["ok"] is False


def test_upgrade_env_reaches_the_new_generation(start_appd, tmp_path):
    write_app(tmp_path, "envecho", ENV_ECHO_APP)
    appd = start_appd("--chdir", str(tmp_path), "envecho:app")
    assert appd.get("/")[2] == b"K=<unset>\n"
    result = appd.ctl("upgrade", "--env", "K=hello world", "--env", "OTHER=1")
    assert result.returncode == 0, result.stderr
    assert appd.get("/")[2] == b"K=hello world\n"
    assert_healthy(appd)


def test_upgrade_no_wait_returns_at_once_then_the_new_generation_serves(start_appd):
    appd = start_appd("slow_import:app", "-w", "1", env={"APP_IMPORT_SECONDS": "0"})
    started = time.monotonic()
    code, result = appd.ctl_json("upgrade", "--no-wait", "--env", "APP_IMPORT_SECONDS=1.5")
    elapsed = time.monotonic() - started
    assert code == 0, result
    assert result["outcome"] == "started"
    assert elapsed < 1.2, f"--no-wait took {elapsed:.2f} s; the new generation needs 1.5 s to boot"
    assert appd.status()["operation"] == "upgrade"
    wait_until(lambda: appd.serving_generation()["id"] == 2, 20, message="generation 2 serving")
    status = wait_idle(appd)
    assert status["last_operation"]["op"] == "upgrade" and status["last_operation"]["ok"] is True
    assert_healthy(appd)


def test_upgrade_prints_progress_lines_on_stderr(start_appd):
    appd = start_appd("-w", "2")
    result = appd.ctl("upgrade")
    assert result.returncode == 0, result.stderr
    progress = result.stderr.splitlines()
    assert any(line.startswith("upgrade: spawned") for line in progress), result.stderr
    assert any(line.startswith("upgrade: booting") for line in progress), result.stderr
    assert any(line.startswith("upgrade: ready") for line in progress), result.stderr
    assert result.stdout.startswith("upgrade: done"), result.stdout
    assert_healthy(appd)


# --- scale ---

def test_scale_up_down_and_to_a_count(start_appd):
    appd = start_appd("-w", "2")
    for spec, expected in (("+1", 3), ("-1", 2), ("4", 4), ("1", 1)):
        code, result = appd.ctl_json("scale", spec)
        assert code == 0, (spec, result)
        assert result["target"] == expected
        status = appd.status()
        assert status["target_workers"] == expected
        assert len(worker_pids(status)) == expected
    assert_healthy(appd)


@pytest.mark.parametrize("spec", ["0", "-2", "+3"])
def test_scale_outside_1_to_max_workers_is_bad_request_exit_2(idle_appd, spec):
    appd = idle_appd
    result = appd.ctl("scale", spec)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "bad_request" in result.stderr and "max_workers (3)" in result.stderr
    status = assert_healthy(appd)
    assert status["target_workers"] == 1 and len(worker_pids(status)) == 1


# --- retire ---

def test_retire_replaces_that_worker(start_appd):
    appd = start_appd("-w", "2")
    victim, other = sorted(worker_pids(appd.status()))
    code, result = appd.ctl_json("retire", str(victim))
    assert code == 0, result
    after = worker_pids(assert_healthy(appd))
    assert victim not in after and other in after and len(after) == 2


def test_retire_of_an_unknown_pid_fails_with_exit_1(idle_appd):
    appd = idle_appd
    before = worker_pids(appd.status())
    result = appd.ctl("retire", "999999")
    assert result.returncode == 1
    assert "999999" in result.stderr
    assert worker_pids(assert_healthy(appd)) == before


# --- reopen-logs ---

def test_reopen_logs_makes_workers_write_a_fresh_access_log(start_appd, tmp_path):
    access = tmp_path / "access.log"
    appd = start_appd("-w", "1", "--access-log", str(access))
    appd.get("/before-rotation")
    wait_until(lambda: b"/before-rotation" in access.read_bytes(), 5, message="access log line")
    access.rename(tmp_path / "access.log.1")
    result = appd.ctl("reopen-logs")
    assert result.returncode == 0, result.stderr

    def fresh_file_has_the_request():
        appd.get("/after-rotation")
        return access.exists() and b"/after-rotation" in access.read_bytes()
    wait_until(fresh_file_has_the_request, 5, interval=0.2, message="a new access.log after reopen-logs")
    assert b"/after-rotation" not in (tmp_path / "access.log.1").read_bytes()
    assert_healthy(appd)


# --- drain and stop ---

def test_drain_exits_0_and_the_daemon_exits_0(start_appd):
    appd = start_appd("-w", "2")
    result = appd.ctl("drain")
    assert result.returncode == 0, result.stderr
    assert "drained" in result.stdout
    assert appd.proc.wait(15) == 0
    assert not os.path.exists(appd.socket)


def test_stop_exits_0_and_the_daemon_exits_0(start_appd):
    appd = start_appd("-w", "2")
    code, result = appd.ctl_json("stop")
    assert code == 0, result
    assert result["outcome"] == "stopped"
    assert appd.proc.wait(15) == 0


# --- exit 3: nobody home ---

def test_missing_socket_path_exits_3(tmp_path):
    result = subprocess.run([APPDCTL, "--socket", str(tmp_path / "absent.sock"), "status"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "absent.sock" in result.stderr


def test_stale_socket_file_without_a_listener_exits_3(tmp_path):
    path = str(tmp_path / "stale.sock")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    assert os.path.exists(path)
    result = subprocess.run([APPDCTL, "--socket", path, "ping"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 3
    assert "stale.sock" in result.stderr and "refused" in result.stderr.lower()


# --- exit 4: busy during a slow upgrade; read-only commands still answer ---

def test_changing_commands_are_busy_while_an_upgrade_runs_but_status_answers(start_appd):
    from appdctl import Client
    appd = start_appd("slow_import:app", "-w", "1", env={"APP_IMPORT_SECONDS": "0"})
    slow = subprocess.Popen([APPDCTL, "--socket", appd.socket, "--json", "upgrade",
                             "--env", "APP_IMPORT_SECONDS=3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: appd.status()["operation"] == "upgrade", 5, message="the upgrade to begin")
        for command in (["upgrade"], ["scale", "+1"], ["reload"], ["retire", "1"], ["drain"]):
            result = appd.ctl(*command)
            assert result.returncode == 4, (command, result.stdout, result.stderr)
            assert "busy: upgrade is running" in result.stderr and "busy: busy" not in result.stderr
        with Client(appd.socket, timeout=5) as client:
            for command in ("status", "ping", "status", "ping"):
                began = time.monotonic()
                client.call(command)
                assert time.monotonic() - began < 0.5, f"{command} took too long during an upgrade"
        result = appd.ctl("status")
        assert result.returncode == 0 and "running: upgrade" in result.stdout
        assert appd.get("/")[0] == 200  # generation 1 serves while 2 imports
        out, err = slow.communicate(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert slow.returncode == 0, err
    status = assert_healthy(appd)
    assert appd.serving_generation()["id"] == 2
    assert status["target_workers"] == 1  # the refused scale changed nothing


def test_timeout_flag_gives_up_with_exit_1_and_says_so(start_appd):
    appd = start_appd("slow_import:app", "-w", "1", env={"APP_IMPORT_SECONDS": "0"})
    began = time.monotonic()
    result = appd.ctl("--timeout", "0.5", "upgrade", "--env", "APP_IMPORT_SECONDS=3")
    assert time.monotonic() - began < 2.5
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "no reply within 0.5 s" in result.stderr
    assert "appdctl status" in result.stderr  # tells the operator where to look
    # The operation goes on in the daemon and succeeds.
    status = wait_idle(appd)
    assert status["last_operation"]["op"] == "upgrade" and status["last_operation"]["ok"] is True
    assert_healthy(appd)


# --- exit 2: usage errors (no daemon contacted) ---

@pytest.mark.parametrize("argv", [
    ["frobnicate"],
    [],
    ["scale", "lots"],
    ["scale", "+"],
    ["scale"],
    ["retire", "not-a-pid"],
    ["upgrade", "--env", "NO_EQUALS_SIGN"],
    ["--timeout", "soon", "status"],
])
def test_usage_errors_exit_2(request, argv):
    appd = request.getfixturevalue("idle_appd") if argv == ["frobnicate"] else None
    socket_path = appd.socket if appd else "/nonexistent/appd.sock"
    result = subprocess.run([APPDCTL, "--socket", socket_path, *argv], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 2, (argv, result.stdout, result.stderr)
    assert "usage:" in result.stderr and "error:" in result.stderr
    if appd:
        assert_healthy(appd)


# --- the Python API ---

def test_python_client_status_and_scale_with_events(start_appd):
    from appdctl import Client, CommandError
    appd = start_appd("-w", "1")
    events = []
    with Client(appd.socket, timeout=30) as client:
        status = client.call("status")
        assert status["daemon"]["pid"] == appd.pid
        result = client.call("scale", on_event=events.append, delta=1)
        assert result["target"] == 2 and result["previous"] == 1
        assert events and all(e["event"] for e in events)
        assert events[0]["event"] == "scaling" and events[0]["target"] == 2
        with pytest.raises(CommandError) as refused:
            client.call("scale", count=0)
        assert refused.value.code == "bad_request" and refused.value.exit_code == 2
        assert client.call("ping")["pid"] == appd.pid  # the same connection keeps working
    assert len(worker_pids(assert_healthy(appd))) == 2


# --- appdctl is light and fast ---

def test_appdctl_imports_neither_structlog_psutil_nor_the_daemon(idle_appd):
    appd = idle_appd
    probe = textwrap.dedent(f"""
        import sys
        from appdctl.cli import main
        code = main(["--socket", {appd.socket!r}, "status"])
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("structlog", "psutil", "appd"))
        print("HEAVY=" + ",".join(heavy))
        sys.exit(code)
    """)
    result = subprocess.run([PY, "-c", probe], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout
    # The same with the console script, as -X importtime reports every module loaded.
    result = subprocess.run([PY, "-X", "importtime", "-m", "appdctl", "--socket", appd.socket, "ping"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "appdctl.client" in imported and "msgpack" in imported
    assert not {m for m in imported if m.split(".")[0] in ("structlog", "psutil", "appd")}
    assert_healthy(appd)
