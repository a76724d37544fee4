"""appd under systemd's protocols, with real processes: sd_notify to a fake
NOTIFY_SOCKET, socket activation by systemd-socket-activate, and the daemon
re-exec'ing itself in place."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import threading
import time

import psutil
import pytest

from conftest import APPD, assert_no_leftovers, copy_of_appd, http_get, wait_until
from helpers import free_port
from loadgen import Load


class NotifyReceiver:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, path):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.path = str(path)
        self.messages: list[tuple[float, list[str]]] = []
        self.running = True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic_ns() // 1000, data.decode().split("\n")))

    def keys(self) -> list[str]:
        """Each message's first line, in order (READY=1, RELOADING=1, STOPPING=1, ...)."""
        return [lines[0] for _, lines in self.messages if not lines[0].startswith("WATCHDOG")]

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def test_notify_ready_reloading_ready_stopping_in_order(start_appd, tmp_path):
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    try:
        appd = start_appd("-w", "2", env={"NOTIFY_SOCKET": receiver.path})
        wait_until(lambda: "READY=1" in receiver.keys(), 5, message="READY=1")
        ready_line = next(lines for _, lines in receiver.messages if lines[0] == "READY=1")
        assert any(line.startswith("STATUS=generation 1, 2/2 workers ready") for line in ready_line), ready_line
        before = time.monotonic_ns() // 1000
        assert appd.ctl("reload").returncode == 0
        after = time.monotonic_ns() // 1000
        wait_until(lambda: receiver.keys().count("READY=1") >= 2, 5, message="second READY=1")
        reloading = next(lines for _, lines in receiver.messages if lines[0] == "RELOADING=1")
        usec = int(next(l for l in reloading if l.startswith("MONOTONIC_USEC=")).split("=")[1])
        assert before <= usec <= after, "MONOTONIC_USEC must be CLOCK_MONOTONIC at the start of the reload"
        assert appd.ctl("drain").returncode == 0
        wait_until(lambda: "STOPPING=1" in receiver.keys(), 5, message="STOPPING=1")
        assert receiver.keys() == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]
    finally:
        receiver.close()


def test_notify_socket_is_not_passed_to_the_app(start_appd, tmp_path):
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    try:
        appd = start_appd("-w", "1", env={"NOTIFY_SOCKET": receiver.path})
        master = psutil.Process(appd.serving_generation()["master_pid"])
        assert "NOTIFY_SOCKET" not in master.environ()
    finally:
        receiver.close()


def test_watchdog_pings_at_half_the_interval(start_appd, tmp_path):
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    try:
        start_appd("-w", "1", env={"NOTIFY_SOCKET": receiver.path, "WATCHDOG_USEC": "600000"})
        wait_until(lambda: sum(l[0] == "WATCHDOG=1" for _, l in receiver.messages) >= 4, 5,
                   message="four WATCHDOG=1")
        stamps = [t for t, l in receiver.messages if l[0] == "WATCHDOG=1"]
        gaps = [b - a for a, b in zip(stamps, stamps[1:])]
        assert all(200_000 <= gap <= 450_000 for gap in gaps), gaps
    finally:
        receiver.close()


@pytest.mark.skipif(not shutil.which("systemd-socket-activate"), reason="systemd-socket-activate not installed")
def test_socket_activation_serves_and_survives_upgrade(tmp_path):
    port = free_port()
    ctl = str(tmp_path / "ctl.sock")
    proc = subprocess.Popen(
        ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=http",
         APPD, "start", "-b", f"127.0.0.1:{port}", "-w", "2", "--control-socket", ctl],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen = {proc.pid}
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10,
                   message="systemd-socket-activate to listen")
        # Socket activation: the port accepts before appd even started; the first
        # request starts it and is answered once generation 1 is ready.
        status, _, body = http_get(f"127.0.0.1:{port}", "/", timeout=20)
        assert status == 200 and b"generation 1" in body
        from appdctl import Client
        with Client(ctl) as client:
            before = client.call("status")
            assert before["daemon"]["pid"] == proc.pid, "systemd-socket-activate execs appd in place"
            assert [l["fd"] for l in before["listeners"]] == [3], "the inherited fd 3 is used, not a new bind"
            seen.update(w["pid"] for g in before["generations"] for w in g["workers"])
            # The start operation ends a loop turn after the first answer; before that
            # an upgrade is (rightly) refused as busy.
            wait_until(lambda: client.call("status")["operation"] is None, 10,
                       message="the start operation to end")
            client.call("upgrade")
            after = client.call("status")
            seen.update(w["pid"] for g in after["generations"] for w in g["workers"])
        assert http_get(f"127.0.0.1:{port}", "/")[2].startswith(b"Hello from appd (generation 2)")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert_no_leftovers(seen)
    assert proc.returncode == 0, "TERM drains and exits 0"


def test_daemon_reexec_keeps_pid_and_serves_under_load(start_appd, tmp_path):
    pkg = copy_of_appd(tmp_path)
    appd = start_appd("-w", "2", env={"PYTHONPATH": str(pkg)})
    before = appd.status()
    (pkg / "appd" / "__init__.py").write_text('"""appd."""\n\n__version__ = "0.1.0+reexec"\n')
    with Load(appd.address, threads=4) as load:
        load.wait_for(20)
        code, result = appd.ctl_json("upgrade", "--daemon")
        assert code == 0, result
        after = appd.status()
        assert after["daemon"]["pid"] == before["daemon"]["pid"] == appd.pid
        assert after["daemon"]["version"] == "0.1.0+reexec"
        assert [g["id"] for g in after["generations"]] == [g["id"] for g in before["generations"]]
        same = ("name", "address", "fd")  # not the backlog's queued count, which moves under load
        assert [{k: l[k] for k in same} for l in after["listeners"]] == \
            [{k: l[k] for k in same} for l in before["listeners"]]
        assert after["last_operation"]["op"] == "upgrade-daemon" and after["last_operation"]["ok"]
        load.wait_for(20)  # still serving after the re-exec
        assert appd.ctl("upgrade").returncode == 0, "the re-exec'd daemon still drives generations"
    assert not load.failures, load.report()


def test_broken_daemon_reexec_leaves_old_daemon_serving(start_appd, tmp_path):
    pkg = copy_of_appd(tmp_path)
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    try:
        appd = start_appd("-w", "2", env={"PYTHONPATH": str(pkg), "NOTIFY_SOCKET": receiver.path})
        (pkg / "appd" / "daemon.py").write_text("this is not python (\n")
        result = appd.ctl("upgrade", "--daemon")
        assert result.returncode == 1
        assert "old daemon keeps running" in result.stderr and "SyntaxError" in result.stderr
        status = appd.status()
        assert status["daemon"]["pid"] == appd.pid and status["daemon"]["state"] == "running"
        assert status["last_operation"]["op"] == "upgrade-daemon" and not status["last_operation"]["ok"]
        assert appd.get("/")[0] == 200
        # systemd is told the reload is over: it must not stay "reloading" forever.
        wait_until(lambda: receiver.keys() == ["READY=1", "RELOADING=1", "READY=1"], 5,
                   message=f"READY=1 after the refused re-exec (got {receiver.keys()})")
    finally:
        receiver.close()
