"""The daemon never dies of bad input and never ends up with nothing serving
(issue 14): hostile config files, arguments and requests get a clear error
naming the cause; an exception anywhere is answered `internal` and the daemon
goes on; recovery starts a generation whenever none serves."""

from __future__ import annotations

import os
import signal
import socket
import struct
import textwrap
import time

import msgpack
import pytest

from appdctl import Client, CommandError, protocol
from conftest import Background, copy_of_appd, running_appd, wait_until
from helpers import assert_healthy

pytestmark = pytest.mark.timeout(120)


def raw_call(socket_path: str, request: dict) -> dict:
    """One request sent as raw msgpack (the Python client would refuse some of them)."""
    body = msgpack.packb(request, use_bin_type=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(socket_path)
        sock.sendall(struct.pack(">I", len(body)) + body)
        decoder = protocol.FrameDecoder()
        while True:
            data = sock.recv(65536)
            assert data, "the daemon closed the connection without a reply"
            for message in decoder.feed(data):
                if "event" not in message:
                    return message


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One daemon with a config file, for the many small bad-input cases."""
    directory = tmp_path_factory.mktemp("robust")
    config = directory / "appd.toml"
    config.write_text("workers = 1\n")
    (directory / "logs").mkdir()
    with running_appd(directory, "--config", str(config), "--access-log", str(directory / "logs" / "a.log"),
                      "--error-log", str(directory / "logs" / "e.log")) as appd:
        appd.config = config
        appd.log_dir = directory / "logs"
        yield appd


# --- config files: every load error is a failed reload naming file and cause ---

BAD_CONFIGS = {
    "latin1": (b"# caf\xe9\nworkers = 1\n", "not UTF-8"),
    "huge_float": (b"timeout = 1" + b"0" * 400 + b"\n", "timeout"),
    "huge_int": (b"backlog = 1" + b"0" * 30 + b"\n", "above the maximum"),
    "nan": (b"boot_timeout = nan\n", "not a finite number"),
    "inf": (b"graceful_timeout = inf\n", "not a finite number"),
    "negative": (b"timeout = -1\n", "negative"),
    "deep": (b"workers = " + b"[" * 3000 + b"]" * 3000 + b"\n", "cannot be read"),
    "nul": (b'chdir = "/tmp\\u0000x"\n', "NUL"),
    "wrong_type": (b"bind = {a = 1}\n", "bind"),
}


@pytest.mark.parametrize("name", sorted(BAD_CONFIGS))
def test_bad_config_file_fails_the_reload_naming_file_and_cause(shared, name):
    content, cause = BAD_CONFIGS[name]
    shared.config.write_bytes(content)
    try:
        code, result = shared.ctl_json("reload")
    finally:
        shared.config.write_text("workers = 1\n")
    assert code == 1, result
    message = result["error"]["message"]
    assert result["error"]["code"] == "failed" and "nothing changed" in message, message
    assert cause in message, message
    assert len(message) < 1000, "the message is bounded"
    if name in ("latin1", "deep"):
        assert str(shared.config) in message
    assert_healthy(shared)


def test_sighup_with_a_latin1_config_keeps_the_daemon(shared):
    shared.config.write_bytes(b"# caf\xe9\n")
    try:
        os.kill(shared.pid, signal.SIGHUP)
        wait_until(lambda: (shared.status()["last_operation"] or {}).get("op") == "reload"
                   and "not UTF-8" in (shared.status()["last_operation"]["error"] or ""), 10,
                   message="the SIGHUP reload to fail")
    finally:
        shared.config.write_text("workers = 1\n")
    assert_healthy(shared)


# --- arguments: validated, bad_request naming the cause ---

@pytest.mark.parametrize("env, needle", [
    ({"A=B": "x"}, "invalid"), ({"": "x"}, "invalid"), ({"A\0B": "x"}, "invalid"),
    ({"A": "x\0y"}, "NUL"), ({"A": 1}, "strings"),
])
def test_upgrade_env_names_and_values_are_validated(shared, env, needle):
    with pytest.raises(CommandError) as raised:
        shared.call("upgrade", env=env)
    assert raised.value.code == "bad_request" and needle in raised.value.message, raised.value
    status = assert_healthy(shared)
    assert status["last_operation"] is None or status["last_operation"]["op"] != "upgrade"


@pytest.mark.parametrize("timeout", [-1, float("nan"), float("inf"), 1e300])
def test_drain_timeout_must_be_a_finite_non_negative_duration(shared, timeout):
    with pytest.raises(CommandError) as raised:
        shared.call("drain", timeout=timeout)
    assert raised.value.code == "bad_request" and "timeout" in raised.value.message
    assert_healthy(shared)


def test_drain_timeout_negative_from_appdctl_is_a_usage_error(shared):
    result = shared.ctl("drain", "--timeout", "-1")
    assert result.returncode == 2, result
    assert "negative" in result.stderr
    assert_healthy(shared)


# --- requests: error messages have bounded reprs ---

def test_deeply_nested_and_huge_requests_get_short_errors(shared):
    nested = []
    for _ in range(1000):
        nested = [nested]
    reply = raw_call(shared.socket, {"v": nested, "id": 1, "cmd": "status"})
    assert reply["error"]["code"] == "bad_request" and len(reply["error"]["message"]) < 300
    reply = raw_call(shared.socket, {"v": [0] * 500_000, "id": 2, "cmd": "status"})
    assert reply["error"]["code"] == "bad_request" and len(reply["error"]["message"]) < 300
    reply = raw_call(shared.socket, {"v": 1, "id": 3, "cmd": "ping", "args": {str(i): 0 for i in range(50_000)}})
    assert reply["error"]["code"] == "bad_request" and len(reply["error"]["message"]) < 300
    assert_healthy(shared)


def test_reopen_logs_after_the_log_directory_was_removed(shared):
    moved = shared.log_dir.with_name("logs-rotated")
    shared.log_dir.rename(moved)
    try:
        result = shared.ctl("reopen-logs")
        assert result.returncode == 1, result
        assert "cannot reopen" in result.stderr and str(shared.log_dir) in result.stderr
        os.kill(shared.pid, signal.SIGUSR1)
        assert_healthy(shared)
    finally:
        moved.rename(shared.log_dir)
    assert shared.ctl("reopen-logs").returncode == 0


class BackgroundCtl:
    """appdctl in a thread."""

    def __init__(self, appd, *args):
        import threading
        self.result = None
        self.thread = threading.Thread(target=lambda: setattr(self, "result", appd.ctl(*args)), daemon=True)
        self.thread.start()

    def join(self, timeout: float = 60):
        self.thread.join(timeout)
        return self.result


# --- the exception boundary itself: code that raises, in a real daemon ---

def test_exceptions_in_commands_operations_signals_timers_and_messages_leave_it_serving(start_appd, tmp_path):
    pkg = copy_of_appd(tmp_path)
    with open(pkg / "appd" / "commands" / "ping.py", "a") as f:
        f.write("\ndef run(daemon, args, responder):\n    raise RuntimeError('boom ' + 'x' * 5000)\n")
    with open(pkg / "appd" / "operations.py", "a") as f:
        f.write("\ndef _broken(self):\n    raise ZeroDivisionError('retire broke')\nRetire.start = _broken\n")
    with open(pkg / "appd" / "daemon.py", "a") as f:
        f.write(textwrap.dedent("""
            def _broken(self):
                raise KeyError('reopen broke')
            Daemon.reopen_logs = _broken

            def _broken_timer(self, group=None):
                raise LookupError('timer broke')
            Generations.kill_stragglers = _broken_timer  # runs from a timer after a generation exits

            _handle = Generations.handle_message
            def _broken_message(self, generation, message):
                _handle(self, generation, message)
                if message.get("t") == "workers":
                    raise ValueError('message broke')
            Generations.handle_message = _broken_message
            """))
    appd = start_appd("-w", "1", "--graceful-timeout", "1", env={"PYTHONPATH": str(pkg)})
    with pytest.raises(CommandError) as raised:
        appd.call("ping")
    assert raised.value.code == "internal" and raised.value.message.startswith("RuntimeError: boom")
    assert len(raised.value.message) < 1000
    worker = appd.serving_generation()["workers"][0]["pid"]
    with pytest.raises(CommandError) as raised:
        appd.call("retire", pid=worker)
    assert raised.value.code == "internal" and "ZeroDivisionError: retire broke" in raised.value.message
    # The broken operation ended: the next changing command is not refused busy.
    assert appd.call("scale", count=2)["target"] == 2
    os.kill(appd.pid, signal.SIGUSR1)  # a signal whose handling raises
    result = appd.ctl("reopen-logs")
    assert result.returncode == 1 and "internal" in result.stderr and "KeyError" in result.stderr
    assert appd.call("upgrade")["outcome"] == "done", "channel messages that raise are each handled"
    wait_until(lambda: "timer broke" in appd.log(), 10, message="the broken timer to fire")
    assert_healthy(appd)
    assert "internal_error" in appd.log() and "reopen broke" in appd.log() and "message broke" in appd.log()


# --- recovery that holds ---

def test_new_master_killed_after_cutover_while_old_drains_is_recovered(start_appd, tmp_path):
    appd = start_appd("reliability_app:app", "-w", "1", "--graceful-timeout", "30",
                      env={"RELIABILITY_STATE": str(tmp_path)})
    slow = Background(appd.address, "/slow?s=6", timeout=30)
    wait_until(lambda: list(tmp_path.glob("busy-*")), 10, message="the slow request in flight")
    killed = []

    def kill_new_master(event):
        if event.get("event") == "ready" and not killed:
            new = [g for g in appd.status()["generations"] if g["id"] == event["generation"]][0]
            os.kill(new["master_pid"], signal.SIGKILL)
            killed.append(new["id"])

    with Client(appd.socket, timeout=60) as client:
        with pytest.raises(CommandError) as raised:
            client.call("upgrade", on_event=kill_new_master)
    assert killed and raised.value.code == "failed" and "after cutover" in raised.value.message
    # Recovery starts a generation while the old one still drains its request.
    recovered = wait_until(lambda: [g for g in appd.status()["generations"]
                                    if g["state"] == "serving" and g["id"] > killed[0]], 20,
                           message="a recovered generation serving")
    assert list(tmp_path.glob("busy-*")), "recovered while the old generation still drained"
    assert appd.get("/", timeout=10)[2].startswith(f"generation {recovered[0]['id']}".encode())
    assert slow.join()[0] == 200


def test_upgrade_env_is_kept_by_crash_recovery_and_reload_through_upgrade(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text('bind = ["127.0.0.1:0"]\n')
    appd = start_appd("env_probe:app", "-w", "1", "--config", str(config))
    assert appd.get("/")[2] == b"-"
    appd.call("upgrade", env={"APPD_TEST_MARK": "kept"})
    assert appd.get("/")[2] == b"kept"
    master = appd.serving_generation()["master_pid"]
    os.kill(master, signal.SIGKILL)
    wait_until(lambda: [g for g in appd.status()["generations"]
                        if g["state"] == "serving" and g["master_pid"] != master], 20, message="crash recovery")
    assert appd.get("/")[2] == b"kept", "crash recovery restarts the serving generation's environment"
    config.write_text('bind = ["127.0.0.1:0", "127.0.0.1:0"]\nbacklog = 100\n')  # new listeners: an upgrade
    result = appd.call("reload")
    assert any("new generation" in note for note in result["notes"]), result
    assert appd.get("/")[2] == b"kept", "a reload through an upgrade keeps it too"


# --- stop takes over from a drain ---

@pytest.mark.parametrize("how", ["appdctl", "SIGQUIT"])
def test_stop_takes_over_from_a_running_drain(start_appd, tmp_path, how):
    appd = start_appd("reliability_app:app", "-w", "1", "--graceful-timeout", "60",
                      env={"RELIABILITY_STATE": str(tmp_path)})
    Background(appd.address, "/slow?s=50", timeout=60)
    wait_until(lambda: list(tmp_path.glob("busy-*")), 10, message="the slow request in flight")
    drain = BackgroundCtl(appd, "drain")
    wait_until(lambda: appd.status()["operation"] == "drain", 10, message="the drain to run")
    started = time.monotonic()
    if how == "SIGQUIT":
        os.kill(appd.pid, signal.SIGQUIT)
    else:
        result = appd.ctl("stop")
        assert result.returncode == 0, result.stderr
    appd.proc.wait(15)
    assert time.monotonic() - started < 15, "stop did not wait for the drain"
    assert appd.proc.returncode == 0
    drained = drain.join()
    assert drained.returncode == 1 and "stop took over" in drained.stderr
