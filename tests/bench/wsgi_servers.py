"""The other WSGI servers of the throughput bench: granian (WSGI interface,
Rust I/O) and uWSGI (pyuwsgi from PyPI, its HTTP socket), and a second appd
from another checkout (APPD_BENCH_BASELINE) to compare before/after in one run.
Started and stopped like servers.py's, each in its own process group."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from asgi_servers import _MultiprocessServer
import socket

from servers import BIN, AppdServer, BenchError, wait_for

BASELINE_ENV = "APPD_BENCH_BASELINE"  # a checkout of appd (with daemon/ and ctl/) to run beside this one


class GranianWsgiServer(_MultiprocessServer):
    """granian --interface wsgi: HTTP/1.1 keep-alive always (there is no per-connection mode)."""

    kind = "granian"

    def command(self) -> list[str]:
        host, _, port = self.address.rpartition(":")
        return [str(BIN / "granian"), "--interface", "wsgi", "--host", host, "--port", port,
                "--workers", str(self.workers), "--http", "1", "--log-level", "warning", self.app]


class UwsgiServer(_MultiprocessServer):
    """uWSGI with its own HTTP parser on the socket: `--http-socket` closes after
    each response (the sync rows), `--http11-socket` keeps connections alive
    (the gthread rows, with `threads` threads per process). wrk counts each close
    of `--http-socket` as a read error (no `Connection: close` is sent): the
    responses are still counted."""

    kind = "uwsgi"

    def main_pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def command(self) -> list[str]:
        socket_kind = "--http11-socket" if self.threads else "--http-socket"
        threads = ["--threads", str(self.threads)] if self.threads else []
        return [str(BIN / "uwsgi"), socket_kind, self.address, "--module", self.app,
                "--processes", str(self.workers), "--master", "--die-on-term", "--lazy-apps",
                "--disable-logging", "--need-app", *threads]

    def wait_started(self, timeout: float) -> None:
        """Its HTTP/1.1 socket keeps a connection open despite `Connection: close`,
        so readiness is the status line alone (not a read to EOF)."""
        def ready():
            self.check_running()
            if len(self.worker_pids()) < self.workers:
                return False
            host, _, port = self.address.rpartition(":")
            try:
                with socket.create_connection((host, int(port)), timeout=2) as sock:
                    sock.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
                    return sock.recv(65536)[9:12] == b"200"
            except OSError:
                return False
        wait_for(ready, timeout, "uwsgi to serve", 0.05)
        self.remember()


class BaselineAppdServer(AppdServer):
    """appd from the checkout named by APPD_BENCH_BASELINE, run with this
    interpreter and packages (PYTHONPATH puts its appd and appdctl first)."""

    kind = "appd-base"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        checkout = Path(os.environ[BASELINE_ENV]).resolve()
        if not (checkout / "daemon" / "__init__.py").exists():
            raise BenchError(f"{BASELINE_ENV}={checkout} is not an appd checkout (no daemon/)")
        packages = Path(tempfile.mkdtemp(prefix="appd-base-", dir=self.workdir))
        (packages / "appd").symlink_to(checkout / "daemon")
        (packages / "appdctl").symlink_to(checkout / "ctl")
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(packages), self.env.get("PYTHONPATH")]))


def baseline_wanted() -> bool:
    return bool(os.environ.get(BASELINE_ENV))
