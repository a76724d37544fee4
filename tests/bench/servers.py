"""appd and gunicorn, started and stopped by the benchmark.

Each server runs in its own session (process group) on 127.0.0.1 with the bench
apps of tests/bench/apps as its working directory. Every pid ever seen is kept
in SEEN_PIDS so run.py can prove at the end that nothing was left behind. All
waits poll with a deadline."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil

BENCH = Path(__file__).resolve().parent
APPS = BENCH / "apps"
BIN = Path(sys.executable).parent

SEEN_PIDS: set[int] = set()
RUNNING: list["Server"] = []   # stopped by run.py on the way out, whatever happened


class BenchError(RuntimeError):
    pass


def wait_for(predicate, timeout: float, what: str, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def children(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children() if p.status() != psutil.STATUS_ZOMBIE]
    except psutil.NoSuchProcess:
        return []


def kill_leftovers(pids, timeout: float = 10.0) -> list[int]:
    """Wait for `pids` to exit; SIGKILL the stragglers. Returns those that had to be killed."""
    try:
        wait_for(lambda: not any(alive(p) for p in pids), timeout, "processes to exit", 0.05)
        return []
    except BenchError:
        stragglers = [p for p in pids if alive(p)]
        for pid in stragglers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return stragglers


def http_get(address: str, path: str = "/", timeout: float = 10.0) -> tuple[int, bytes]:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    response = b"".join(chunks)
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head[9:12]), body


def answering_pid(address: str, path: str = "/", timeout: float = 10.0) -> int:
    """The pid named in a bench app's answer ("... pid 1234")."""
    status, body = http_get(address, path, timeout)
    if status != 200:
        raise BenchError(f"GET {path} answered {status}")
    return int(body.split(b"pid ")[-1].split()[0])


def _clean_env(extra: dict | None) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("APPD_", "GUNICORN_", "LISTEN_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.update(extra or {})
    return env


class Server:
    kind = "?"

    def __init__(self, app: str, workers: int, workdir: Path, preload: bool = False,
                 env: dict | None = None, control: bool = False, threads: int | None = None,
                 keepalive: float | None = None):
        """threads: None for sync workers, N for gthread workers with N threads and
        HTTP/1.1 keep-alive connections kept `keepalive` seconds while idle."""
        self.app, self.workers, self.preload, self.control = app, workers, preload, control
        self.threads, self.keepalive = threads, keepalive
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.marks = workdir / "marks"
        self.marks.mkdir(exist_ok=True)
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}/"
        self.env = _clean_env({"BENCH_MARK_DIR": str(self.marks), **(env or {})})
        self.proc: subprocess.Popen | None = None
        self.log_path = workdir / f"{self.kind}.log"

    # --- lifecycle ---
    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=APPS, env=self.env, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        SEEN_PIDS.add(self.proc.pid)
        RUNNING.append(self)
        try:
            self.wait_started(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def check_running(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.kind} exited with {self.proc.returncode}; log:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def remember(self) -> None:
        for pid in self.tree():
            SEEN_PIDS.add(pid)

    def tree(self) -> list[int]:
        pids = [self.main_pid()] if self.main_pid() else []
        return pids + [p for pid in pids for p in descendants(pid)]

    def stop(self, timeout: float = 30.0) -> None:
        if self in RUNNING:
            RUNNING.remove(self)
        if self.proc is None:
            return
        self.remember()
        pids = set(self.tree()) | {self.proc.pid}
        main = self.main_pid()
        if main and alive(main):
            try:
                os.kill(main, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            wait_for(lambda: not any(alive(p) for p in pids), max(0.5, deadline - time.monotonic()),
                     f"{self.kind} to stop", 0.05)
        except BenchError:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            kill_leftovers(pids, 5.0)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._log.close()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # --- what both answer ---
    def main_pid(self) -> int | None:
        """The daemon (appd) or the current master (gunicorn)."""
        raise NotImplementedError

    def worker_pids(self) -> list[int]:
        raise NotImplementedError

    def ready_marked(self, pids) -> bool:
        return all((self.marks / f"ready-{pid}").exists() for pid in pids)

    def busy_marked(self, pids) -> bool:
        return all((self.marks / f"busy-{pid}").exists() for pid in pids)

    def clear_busy_marks(self) -> None:
        for path in self.marks.glob("busy-*"):
            path.unlink(missing_ok=True)


class AppdServer(Server):
    kind = "appd"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.socket = str(self.workdir / "ctl.sock")

    def command(self) -> list[str]:
        gthread = ["--worker-class", "gthread", "--threads", str(self.threads),
                   *(["--keepalive", f"{self.keepalive:g}"] if self.keepalive is not None else [])]
        return [str(BIN / "appd"), "start", self.app, "-b", self.address, "-w", str(self.workers),
                "--control-socket", self.socket, "--log-level", "warning",
                *(["--preload-app"] if self.preload else []), *(gthread if self.threads else [])]

    def main_pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def status(self) -> dict:
        from appdctl import Client
        with Client(self.socket, timeout=10) as client:
            return client.call("status")

    def serving(self) -> dict | None:
        gens = [g for g in self.status()["generations"] if g["state"] == "serving"]
        return gens[-1] if gens else None

    def worker_pids(self) -> list[int]:
        gen = self.serving()
        return [w["pid"] for w in gen["workers"]] if gen else []

    def master_pid(self) -> int:
        return self.serving()["master_pid"]

    def wait_started(self, timeout: float) -> None:
        def ready():
            self.check_running()
            if not os.path.exists(self.socket):
                return False
            try:
                status = self.status()
            except (OSError, Exception):  # not listening yet
                return False
            gens = [g for g in status["generations"] if g["state"] == "serving"]
            return bool(gens) and gens[-1]["ready_workers"] >= status["target_workers"]
        wait_for(ready, timeout, "appd to serve", 0.05)
        self.remember()

    def ctl(self, *args: str, timeout: float = 300.0) -> tuple[float, subprocess.CompletedProcess]:
        """Run appdctl as an operator would; returns (seconds, completed process)."""
        t0 = time.monotonic()
        done = subprocess.run([str(BIN / "appdctl"), "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=timeout)
        return time.monotonic() - t0, done

    def operation(self, *args: str) -> float:
        self.remember()
        seconds, done = self.ctl(*args)
        self.remember()
        if done.returncode != 0:
            raise BenchError(f"appdctl {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return seconds


class GunicornServer(Server):
    kind = "gunicorn"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.pidfile = self.workdir / "gunicorn.pid"
        self.control_socket = str(self.workdir / "gunicorn.ctl")

    def command(self) -> list[str]:
        control = ["--control-socket", self.control_socket] if self.control else ["--no-control-socket"]
        worker = (["--worker-class", "gthread", "--threads", str(self.threads),
                   *(["--keep-alive", f"{self.keepalive:g}"] if self.keepalive is not None else [])]
                  if self.threads else ["--worker-class", "sync"])
        return [str(BIN / "gunicorn"), self.app, "-b", self.address, "-w", str(self.workers),
                *worker, "--pid", str(self.pidfile), "--log-level", "warning",
                *control, *(["--preload"] if self.preload else [])]

    def _read_pid(self, path: Path) -> int | None:
        try:
            text = path.read_text().strip()
            return int(text) if text else None
        except (OSError, ValueError):
            return None

    def main_pid(self) -> int | None:
        pid = self._read_pid(self.pidfile)
        if pid and alive(pid):
            return pid
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def worker_pids(self) -> list[int]:
        master = self.main_pid()
        return children(master) if master else []

    def workers_ready(self, master: int, count: int, exclude=()) -> list[int] | None:
        pids = children(master)
        if len(pids) != count or set(pids) & set(exclude):
            return None
        if not self.preload and not self.ready_marked(pids):
            return None
        return pids

    def wait_started(self, timeout: float) -> None:
        def ready():
            self.check_running()
            master = self._read_pid(self.pidfile)
            if master != self.proc.pid or not self.workers_ready(master, self.workers):
                return False
            try:
                return http_get(self.address, timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, "gunicorn to serve", 0.05)
        self.remember()

    def hup(self, timeout: float = 60.0) -> float:
        """kill -HUP, then wait until every worker is a new, booted one."""
        master = self.main_pid()
        old = children(master)
        t0 = time.monotonic()
        os.kill(master, signal.SIGHUP)
        wait_for(lambda: self.workers_ready(master, self.workers, exclude=old), timeout, "HUP's new workers")
        seconds = time.monotonic() - t0
        self.remember()
        return seconds

    def usr2_upgrade(self, timeout: float = 60.0) -> float:
        """USR2 → wait for the new master's pidfile and booted workers → TERM the old
        master → wait until it is gone. Then wait for the new master to promote itself
        (pidfile renamed back) so the next USR2 is accepted. Returns the seconds
        from USR2 to the old master gone."""
        old_master = self.main_pid()
        new_pidfile = Path(str(self.pidfile) + ".2")
        t0 = time.monotonic()
        os.kill(old_master, signal.SIGUSR2)
        new_master = wait_for(lambda: self._read_pid(new_pidfile), timeout, "the new master's pidfile")
        SEEN_PIDS.add(new_master)
        wait_for(lambda: self.workers_ready(new_master, self.workers), timeout, "the new master's workers")
        self.remember()
        os.kill(old_master, signal.SIGTERM)
        if self.proc.pid == old_master:
            self.proc.wait(timeout)
        wait_for(lambda: not alive(old_master), timeout, "the old master to exit")
        seconds = time.monotonic() - t0
        wait_for(lambda: self._read_pid(self.pidfile) == new_master, timeout, "the new master's promotion")
        return seconds

    def ttin(self) -> int:
        master = self.main_pid()
        os.kill(master, signal.SIGTTIN)
        return master
