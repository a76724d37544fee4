"""appd.systemd (sd_notify, watchdog) and the example unit files in systemd/."""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS_DIR = ROOT / "systemd"
UNIT_FILES = ["appd.service", "appd.socket", "appd@.service"]
VERIFY_TIMEOUT_S = 60


def _load_module():
    try:
        import appd.systemd as module  # the installed / shimmed package
        return module
    except ImportError:
        # daemon/ may not be a regular package yet: load the file by path.
        spec = importlib.util.spec_from_file_location("appd_systemd_under_test", ROOT / "daemon" / "systemd.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


sd = _load_module()


@pytest.fixture(autouse=True)
def _fresh_socket():
    sd._reset()
    yield
    sd._reset()


@pytest.fixture
def receiver():
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""
    directory = tempfile.mkdtemp(prefix="sdn-", dir="/tmp")  # short: sun_path is 108 bytes
    path = os.path.join(directory, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    try:
        yield sock, path
    finally:
        sock.close()
        shutil.rmtree(directory, ignore_errors=True)


# --- notify -----------------------------------------------------------------


def test_notify_sends_one_datagram_to_a_path(receiver):
    sock, path = receiver
    assert sd.notify("READY=1", "STATUS=serving 4 workers", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving 4 workers"
    assert sd.notify("WATCHDOG=1", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"WATCHDOG=1"


def test_notify_to_abstract_socket():
    name = f"appd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    try:
        assert sd.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}) is True
        assert sock.recv(4096) == b"STOPPING=1"
    finally:
        sock.close()


def test_notify_without_notify_socket_is_a_silent_no_op():
    assert sd.notify("READY=1", environ={}) is False
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": ""}) is False
    assert sd._sock is None  # nothing was created


def test_notify_never_raises_on_send_errors(tmp_path):
    missing = str(tmp_path / "no-such-socket")
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": missing}) is False
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": "relative/path"}) is False
    not_a_socket = tmp_path / "file"
    not_a_socket.write_text("")
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": str(not_a_socket)}) is False


def test_notify_recovers_after_a_failed_send(receiver, tmp_path):
    sock, path = receiver
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": str(tmp_path / "gone")}) is False
    assert sd.notify("READY=1", environ={"NOTIFY_SOCKET": path}) is True
    assert sock.recv(4096) == b"READY=1"


def test_notify_reuses_one_socket_per_process(receiver):
    sock, path = receiver
    environ = {"NOTIFY_SOCKET": path}
    assert sd.notify("STATUS=a", environ=environ)
    first = sd._sock
    assert sd.notify("STATUS=b", environ=environ)
    assert sd._sock is first
    assert [sock.recv(4096), sock.recv(4096)] == [b"STATUS=a", b"STATUS=b"]


def test_notify_after_fork_uses_its_own_socket(receiver):
    sock, path = receiver
    environ = {"NOTIFY_SOCKET": path}
    assert sd.notify("STATUS=parent", environ=environ)
    parent_sock = sd._sock
    pid = os.fork()
    if pid == 0:  # child: exit status carries the verdict
        ok = sd.notify("STATUS=child", environ=environ) and sd._sock is not parent_sock
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert sorted([sock.recv(4096), sock.recv(4096)]) == [b"STATUS=child", b"STATUS=parent"]
    assert sd._sock is parent_sock and sd._sock.fileno() >= 0


# --- reloading_lines / watchdog_interval -------------------------------------


def test_reloading_lines_use_monotonic_microseconds():
    before = time.monotonic_ns() // 1000
    lines = sd.reloading_lines()
    after = time.monotonic_ns() // 1000
    assert lines[0] == "RELOADING=1"
    key, _, value = lines[1].partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_watchdog_interval_is_half_of_watchdog_usec():
    assert sd.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert sd.watchdog_interval({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}) == 0.5


def test_watchdog_interval_respects_watchdog_pid_and_bad_values():
    assert sd.watchdog_interval({}) is None
    assert sd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}) is None
    assert sd.watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "x"}) is None
    assert sd.watchdog_interval({"WATCHDOG_USEC": "soon"}) is None
    assert sd.watchdog_interval({"WATCHDOG_USEC": "0"}) is None


# --- unit files ---------------------------------------------------------------


def _unit_settings(name: str) -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (UNITS_DIR / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.mark.parametrize("name", ["appd.service", "appd@.service"])
def test_service_units_follow_the_contract(name):
    s = _unit_settings(name)
    assert s["Type"] == ["notify"]
    assert s["NotifyAccess"] == ["main"]
    assert "appdctl" in s["ExecReload"][0] and s["ExecReload"][0].endswith(" reload")
    assert "ExecStop" not in s  # SIGTERM is the graceful drain
    assert s["KillSignal"] == ["SIGTERM"] and s["KillMode"] == ["mixed"]
    assert s["TimeoutStopSec"] == ["35s"]  # graceful_timeout (30) + 5
    assert s["Restart"] == ["on-failure"]
    assert s["WatchdogSec"] == ["30s"]
    assert s["RuntimeDirectory"] == ["appd"]
    assert "MemoryDenyWriteExecute" not in s


def test_template_unit_uses_instance_paths():
    s = _unit_settings("appd@.service")
    assert "--config /etc/appd/%i.toml" in s["ExecStart"][0]
    assert "--control-socket /run/appd/%i.sock" in s["ExecStart"][0]
    assert "--socket /run/appd/%i.sock" in s["ExecReload"][0]


def test_socket_unit_names_its_listener():
    s = _unit_settings("appd.socket")
    assert s["ListenStream"] == ["127.0.0.1:8000"]
    assert s["FileDescriptorName"] == ["http"]
    assert s["Service"] == ["appd.service"]


def _verify(directory: Path, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["systemd-analyze", "verify", str(directory / unit)],
        cwd=directory, capture_output=True, text=True, timeout=VERIFY_TIMEOUT_S,
        env={**os.environ, "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"},
    )


def _problems(result: subprocess.CompletedProcess, unit: str) -> list[str]:
    """Output lines about `unit`; verify reports a template as an instance ("appd@i.service")."""
    needle = unit.split("@", 1)[0] + "@" if "@" in unit else unit
    return [line for line in (result.stderr + result.stdout).splitlines() if needle in line]


@pytest.fixture(scope="module")
def verify_works(tmp_path_factory):
    """Skip unless systemd-analyze verify runs here at all (tried on a known-good unit)."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not on PATH")
    directory = tmp_path_factory.mktemp("verify-probe")
    (directory / "probe.service").write_text("[Service]\nType=simple\nExecStart=/bin/true\n")
    try:
        result = _verify(directory, "probe.service")
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"systemd-analyze verify cannot run here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"systemd-analyze verify fails even on a trivial unit here: {result.stderr.strip()}")
    return True


@pytest.fixture(scope="module")
def verify_dir(tmp_path_factory, verify_works):
    """Copies of the units whose binaries point at stub executables (verify needs them to exist)."""
    directory = tmp_path_factory.mktemp("units")
    bin_dir = directory / "bin"
    bin_dir.mkdir()
    for program in ("appd", "appdctl"):
        stub = bin_dir / program
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    for name in UNIT_FILES:
        text = (UNITS_DIR / name).read_text()
        text = text.replace("/usr/local/bin/appdctl ", f"{bin_dir}/appdctl ")
        text = text.replace("/usr/local/bin/appd ", f"{bin_dir}/appd ")
        assert "/usr/local/bin/appd" not in "\n".join(
            l for l in text.splitlines() if l.startswith("Exec")), "an Exec line was not rewritten"
        (directory / name).write_text(text)
    # An instance of the template, so %i is expanded into real paths.
    shutil.copy(directory / "appd@.service", directory / "appd@demo.service")
    return directory


@pytest.mark.parametrize("unit", UNIT_FILES + ["appd@demo.service"])
def test_systemd_analyze_verify(verify_dir, unit):
    result = _verify(verify_dir, unit)
    assert result.returncode == 0, result.stderr
    assert _problems(result, unit) == [], result.stderr


def test_verify_check_catches_mistakes(verify_dir, tmp_path):
    """The checks above would notice a bad unit: unknown keys only warn, with exit 0."""
    bad = (verify_dir / "appd.service").read_text().replace("KillMode=mixed", "KillMode=mixed\nKillModee=mixed")
    (verify_dir / "typo.service").write_text(bad)
    result = _verify(verify_dir, "typo.service")
    assert _problems(result, "typo.service"), result.stderr
    # A template is reported under an instance name; a missing binary fails it.
    shutil.copy(UNITS_DIR / "appd@.service", tmp_path / "other@.service")
    text = (tmp_path / "other@.service").read_text().replace("/usr/local/bin/", "/nonexistent/bin/")
    (tmp_path / "other@.service").write_text(text)
    result = _verify(tmp_path, "other@.service")
    assert result.returncode != 0 and _problems(result, "other@.service"), result.stderr
