"""ASGI servers for the asgi bench: appd's asgi worker, uvicorn (--workers,
httptools, uvloop), granian (ASGI interface) and gunicorn with uvicorn's
worker class. Started, stopped and checked for leftovers like servers.py's."""

from __future__ import annotations

import os
import signal
import time

import psutil

from servers import (BIN, AppdServer, BenchError, GunicornServer, Server, alive, children, http_get,
                     wait_for)

KEEPALIVE = 5  # seconds an idle keep-alive connection is kept, the same for every server


class AppdAsgiServer(AppdServer):
    kind = "appd"

    def command(self) -> list[str]:
        return super().command() + ["--worker-class", "asgi", "--keepalive", str(KEEPALIVE)]


class _MultiprocessServer(Server):
    """A server whose main process forks its workers and restarts them on SIGHUP."""

    def main_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def worker_pids(self) -> list[int]:
        """Children, less multiprocessing's resource tracker (it lives as long as the server)."""
        pids = []
        for pid in children(self.proc.pid) if self.proc else []:
            try:
                if "resource_tracker" not in " ".join(psutil.Process(pid).cmdline()):
                    pids.append(pid)
            except psutil.NoSuchProcess:
                pass
        return pids

    def wait_started(self, timeout: float) -> None:
        def ready():
            self.check_running()
            if len(self.worker_pids()) < self.workers:
                return False
            try:
                return http_get(self.address, timeout=2)[0] == 200
            except OSError:
                return False
        wait_for(ready, timeout, f"{self.kind} to serve", 0.05)
        self.remember()

    def hup(self, timeout: float = 60.0) -> float:
        """kill -HUP; wait until every old worker has exited and a new one answers."""
        old = set(self.worker_pids())
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGHUP)

        def replaced():
            self.remember()
            if any(alive(pid) for pid in old) or len(self.worker_pids()) < self.workers:
                return False
            try:
                status, body = http_get(self.address, timeout=2)
            except OSError:
                return False
            return status == 200
        wait_for(replaced, timeout, f"{self.kind}'s new workers after SIGHUP", 0.02)
        return time.monotonic() - t0


class UvicornServer(_MultiprocessServer):
    kind = "uvicorn"

    def command(self) -> list[str]:
        host, _, port = self.address.rpartition(":")
        return [str(BIN / "uvicorn"), self.app, "--host", host, "--port", port,
                "--workers", str(self.workers), "--http", "httptools", "--loop", "uvloop",
                "--no-access-log", "--log-level", "warning", "--timeout-keep-alive", str(KEEPALIVE)]


class GranianServer(_MultiprocessServer):
    kind = "granian"

    def command(self) -> list[str]:
        host, _, port = self.address.rpartition(":")
        return [str(BIN / "granian"), "--interface", "asgi", "--host", host, "--port", port,
                "--workers", str(self.workers), "--loop", "uvloop", "--http", "1",
                "--log-level", "warning", self.app]


class GunicornUvicornServer(GunicornServer):
    kind = "gunicorn+uvicorn"

    def command(self) -> list[str]:
        command = super().command()
        at = command.index("--worker-class")
        command[at + 1] = "uvicorn.workers.UvicornWorker"
        return command + ["--keep-alive", str(KEEPALIVE)]

    def workers_ready(self, master: int, count: int, exclude=()) -> list[int] | None:
        pids = children(master)
        if len(pids) != count or set(pids) & set(exclude):
            return None
        return pids


def make(kind: str, app: str, workers: int, ctx) -> Server:
    classes = {"appd": AppdAsgiServer, "uvicorn": UvicornServer, "granian": GranianServer,
               "gunicorn+uvicorn": GunicornUvicornServer}
    if kind not in classes:
        raise BenchError(f"unknown ASGI server {kind!r}")
    return classes[kind](app, workers, ctx.dir(f"{kind}-{app.split(':')[0]}-{workers}w"))
