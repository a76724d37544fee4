"""Shared harness: start a real appd, talk to it with appdctl and HTTP, and
prove afterwards that no process it started is left behind. Small shared checks
(worker_pids, assert_healthy, reaping_orphans, free_port, keepalive_soak) are
in tests/helpers.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
APPS = Path(__file__).resolve().parent / "apps"
BIN = Path(sys.executable).parent
APPD = str(BIN / "appd")
APPDCTL = str(BIN / "appdctl")


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05, message: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except Exception as exc:  # the thing polled may not exist yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {message}"
                         + (f" (last error: {last_error!r})" if last_error else ""))


def http_get(address: str, path: str = "/", timeout: float = 10.0, method: str = "GET",
             body: bytes | None = None, headers: dict | None = None):
    """One request on a new connection; returns (status, headers, body)."""
    if address.startswith("unix:"):
        conn = UnixHTTPConnection(address[5:], timeout=timeout)
    else:
        host, _, port = address.rpartition(":")
        conn = http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 10.0):
        super().__init__("localhost", timeout=timeout)
        self.unix_path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self.unix_path)


class Background:
    """One HTTP request in a thread; .join() gives (status, headers, body) or the exception."""

    def __init__(self, address: str, path: str, timeout: float = 30.0):
        self.result = None
        self.thread = threading.Thread(target=self._run, args=(address, path, timeout), daemon=True)
        self.thread.start()

    def _run(self, address, path, timeout):
        try:
            self.result = http_get(address, path, timeout=timeout)
        except Exception as exc:  # a dropped connection may be the outcome under test
            self.result = exc

    def join(self, timeout: float = 30.0):
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the background request did not finish"
        return self.result


class Appd:
    """A running `appd start` in its own session, with its socket in a temp dir."""

    def __init__(self, tmp_path: Path, args: list[str], env: dict | None, cwd: Path):
        self.tmp = tmp_path
        self.socket = str(tmp_path / "ctl.sock")
        self.log_path = tmp_path / "appd.log"
        self.env = {**os.environ, "APPD_LOG_FORMAT": "console", **(env or {})}
        self.env.pop("APPD_SOCKET", None)
        cmd = [APPD, "start", "--control-socket", self.socket, *args]
        if not any(a in ("-b", "--bind") or a.startswith("--bind=") for a in args):
            cmd[2:2] = ["--bind", "127.0.0.1:0"]
        self.log_file = open(self.log_path, "wb")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=self.log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: set[int] = set()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ctl(self, *args: str, timeout: float = 120.0, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([APPDCTL, "--socket", self.socket, *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})

    def ctl_json(self, *args: str, timeout: float = 120.0) -> tuple[int, dict]:
        result = self.ctl("--json", *args, timeout=timeout)
        lines = result.stdout.strip()
        # Events come as JSON lines first; the final object is the last (indented) document.
        decoder = json.JSONDecoder()
        objects, index = [], 0
        while index < len(lines):
            obj, end = decoder.raw_decode(lines, index)
            objects.append(obj)
            index = end
            while index < len(lines) and lines[index].isspace():
                index += 1
        return result.returncode, (objects[-1] if objects else {})

    def status(self) -> dict:
        from appdctl import Client
        with Client(self.socket, timeout=10) as client:
            status = client.call("status")
        self.remember(status)
        return status

    def remember(self, status: dict) -> None:
        for gen in status["generations"]:
            self.seen.add(gen["master_pid"])
            self.seen.update(w["pid"] for w in gen["workers"])

    def call(self, cmd: str, **args):
        from appdctl import Client
        with Client(self.socket, timeout=120) as client:
            return client.call(cmd, **args)

    def wait_ready(self, timeout: float = 30.0) -> dict:
        def serving():
            if self.proc.poll() is not None:
                raise AssertionError(f"appd exited with {self.proc.returncode}:\n{self.log()}")
            status = self.status()
            gens = [g for g in status["generations"] if g["state"] == "serving"]
            return status if gens and gens[-1]["ready_workers"] >= status["target_workers"] else None
        return wait_until(serving, timeout, message="appd to serve")

    @property
    def address(self) -> str:
        return self.status()["listeners"][0]["address"]

    def get(self, path: str = "/", **kwargs):
        return http_get(self.address, path, **kwargs)

    def serving_generation(self) -> dict:
        return [g for g in self.status()["generations"] if g["state"] == "serving"][-1]

    def descendants(self) -> set[int]:
        try:
            return {p.pid for p in psutil.Process(self.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            return set()

    def stop(self, timeout: float = 20.0) -> None:
        """Drain with TERM; kill whatever is left; record everything we ever saw."""
        self.seen |= self.descendants()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log_file.close()


def copy_of_appd(tmp_path: Path) -> Path:
    """A private copy of the appd packages, to put first on PYTHONPATH, so a test can change 'new code'."""
    import shutil
    pkg = tmp_path / "pkg"
    shutil.copytree(ROOT / "daemon", pkg / "appd", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "ctl", pkg / "appdctl", ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def leftover(pids) -> list[psutil.Process]:
    """Processes from `pids` still alive (zombies count: nobody reaped them)."""
    alive = []
    for pid in pids:
        try:
            process = psutil.Process(pid)
            if process.status() == psutil.STATUS_ZOMBIE or process.is_running():
                alive.append(process)
        except psutil.NoSuchProcess:
            pass
    return alive


def assert_no_leftovers(pids, timeout: float = 10.0) -> None:
    try:
        wait_until(lambda: not leftover(pids), timeout, message="all appd processes to exit")
    except AssertionError:
        survivors = leftover(pids)
        for process in survivors:
            try:
                process.kill()
            except psutil.Error:
                pass
        raise AssertionError(f"processes left behind: {[(p.pid, p.name()) for p in survivors]}")


@contextlib.contextmanager
def running_appd(directory: Path, *args: str, env: dict | None = None, cwd: Path = APPS):
    """One appd for many small cases (module-scoped fixtures); stopped and checked for
    leftover processes on exit."""
    appd = Appd(directory, list(args), env, cwd)
    try:
        appd.wait_ready()
        yield appd
    finally:
        appd.stop()
        assert_no_leftovers(appd.seen | {appd.pid})


@pytest.fixture
def start_appd(tmp_path):
    """start_appd(*args, env=..., cwd=..., wait=True) -> Appd. All are stopped and
    checked for leftover processes at teardown."""
    started: list[Appd] = []

    def start(*args: str, env: dict | None = None, cwd: Path = APPS, wait: bool = True) -> Appd:
        directory = tmp_path / f"appd{len(started)}"
        directory.mkdir()
        appd = Appd(directory, list(args), env, cwd)
        started.append(appd)
        if wait:
            appd.wait_ready()
        return appd

    yield start
    for appd in started:
        appd.stop()
    for appd in started:
        assert_no_leftovers(appd.seen | {appd.pid})
