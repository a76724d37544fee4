"""The master's view of one worker process (the worker's own code is in workers/)."""

from __future__ import annotations

import os
import socket
import time

from .metrics import merge, parse_deltas
from .workers.notify import parse

BOOTING, READY, STOPPING = "booting", "ready", "stopping"


class WorkerHandle:
    def __init__(self, pid: int, sock: socket.socket, serial: int, heartbeats: bool = True):
        self.pid = pid
        self.heartbeats = heartbeats  # held to `timeout` (a command worker only once it sends WATCHDOG=1)
        self.sock = sock              # master's end of the notify socket
        self.serial = serial          # spawn order within the generation
        self.spawned_at = time.monotonic()
        self.started_wall = time.time()
        self.ready_at: float | None = None
        self.last_heartbeat = self.spawned_at
        self.requests = 0
        self.busy: int | None = None          # reported by workers that track it
        self.request_age: float | None = None
        self.outgoing = False         # to be retired once a replacement is ready
        self.stop_sent_at: float | None = None
        self.kill_at: float | None = None   # SIGKILL if still alive then
        self.forced = False                 # it needed SIGABRT or SIGKILL
        self.boot_error: str | None = None
        self.unreported: dict = {}          # request counts not yet passed on to the daemon
        self.stop_cause: str | None = None  # why the master stopped it (worker exits metric)
        self.request_start: float | None = None  # wall time the current request began (sync worker)

    @property
    def ready(self) -> bool:
        return self.ready_at is not None

    @property
    def state(self) -> str:
        if self.stop_sent_at is not None:
            return STOPPING
        if self.outgoing:
            return "outgoing"
        return READY if self.ready else BOOTING

    def read_reports(self) -> bool:
        """Take every pending datagram; return True if the worker just became ready."""
        became_ready = False
        while True:
            try:
                datagram = self.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return became_ready
            except OSError:
                return became_ready
            fields = parse(datagram)
            now = time.monotonic()
            if "X_APPD_BOOT_ERROR" in fields:
                self.boot_error = fields["X_APPD_BOOT_ERROR"]
            if fields.get("READY") == "1" and self.ready_at is None:
                self.ready_at = now
                became_ready = True
            if fields.get("WATCHDOG") == "1" or "X_APPD_REQUESTS" in fields:
                self.last_heartbeat = now
                self.heartbeats = True
            if "X_APPD_REQUESTS" in fields:
                self.requests = int(fields["X_APPD_REQUESTS"] or 0)
            if "X_APPD_BUSY" in fields:
                self.busy = int(fields["X_APPD_BUSY"] or 0)
                self.request_age = float(fields.get("X_APPD_REQUEST_AGE") or 0)
                self.request_start = float(fields["X_APPD_REQUEST_START"]) if "X_APPD_REQUEST_START" in fields \
                    else None
            if "X_APPD_METRICS" in fields:
                merge(self.unreported, parse_deltas(fields["X_APPD_METRICS"]))

    def send(self, text: str) -> None:
        try:
            self.sock.send(text.encode())
        except OSError:
            pass  # gone, or a command worker (its socket is receive-only)

    def kill(self, signum: int) -> None:
        try:
            os.kill(self.pid, signum)
        except ProcessLookupError:
            pass

    def mark_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.last_heartbeat = self.ready_at

    def stop(self, signum: int, grace: float) -> None:
        """Ask the worker to stop; it is SIGKILLed if still alive after `grace` seconds."""
        now = time.monotonic()
        if self.stop_sent_at is None:
            self.stop_sent_at = now
        self.kill_at = min(self.kill_at or now + grace, now + grace)
        self.kill(signum)

    def force(self, signum: int, grace: float = 2.0) -> None:
        """SIGABRT (hung) or SIGKILL now; SIGKILL after `grace` if that was not enough."""
        self.forced = True
        self.kill_at = time.monotonic() + grace
        self.kill(signum)

    def describe(self) -> dict:
        described = {"pid": self.pid, "state": self.state, "started_at": self.started_wall,
                     "requests": self.requests}
        if self.busy is not None:
            # A sync worker cannot report while it serves: it sent when its request began.
            age = time.time() - self.request_start if self.request_start is not None else self.request_age
            described.update(busy=self.busy, request_age_s=round(max(0.0, age), 3))
        return described

    def close(self) -> None:
        self.sock.close()
