"""The master's view of one worker process (the worker's own code is in workers/).

A worker's life as the master sees it (WorkerState):

    BOOTING --mark_ready--> READY --replace--> OUTGOING --stop--> STOPPING --> reaped
       |                      |  <---keep----     |                   |
       +----------------------+------stop---------+                   |
       +----------------------+------force (hung, boot/stop timeout)--+--> KILLED

The master asks named questions (counts_toward_target, taking_requests, ...)
rather than combining flags; timestamps (ready_at, stop_sent_at, kill_at) are data.
"""

from __future__ import annotations

import enum
import os
import socket
import time

from .messages import PAUSED_REPORT
from .metrics import merge, parse_deltas
from .workers.notify import parse


class WorkerState(enum.Enum):
    BOOTING = "booting"    # forked, has not said READY=1 yet
    READY = "ready"        # serving, counts toward the target
    OUTGOING = "outgoing"  # still serving, to be stopped once a successor is ready (reload, retire, recycle)
    STOPPING = "stopping"  # told to stop gracefully; SIGKILLed at kill_at
    KILLED = "killed"      # hung or overdue: SIGABRT/SIGKILL sent


class WorkerHandle:
    def __init__(self, pid: int, sock: socket.socket, serial: int, heartbeats: bool = True):
        self.pid = pid
        self.heartbeats = heartbeats  # held to `timeout` (a command worker only once it sends WATCHDOG=1)
        self.sock = sock              # master's end of the notify socket
        self.serial = serial          # spawn order within the generation
        self.state = WorkerState.BOOTING
        self.spawned_at = time.monotonic()
        self.started_wall = time.time()
        self.ready_at: float | None = None
        self.last_heartbeat = self.spawned_at
        self.requests = 0
        self.busy: int | None = None          # reported by workers that track it
        self.request_age: float | None = None
        self.stop_sent_at: float | None = None
        self.kill_at: float | None = None   # SIGKILL if still alive then
        self.boot_error: str | None = None
        self.unreported: dict = {}          # request counts not yet passed on to the daemon
        self.stop_cause: str | None = None  # why the master stopped it (worker exits metric)
        self.request_start: float | None = None  # wall time the current request began (sync worker)
        self.paused = False  # it said it stands by (X_APPD_PAUSED=1): alive, app loaded, not accepting

    # --- questions the master asks ---

    @property
    def ready(self) -> bool:
        """It loaded the app and entered its accept loop (whatever happened since)."""
        return self.ready_at is not None

    def counts_toward_target(self) -> bool:
        """The workers manage_workers counts: booting or serving, and staying. A hung worker
        the master killed counts until it is reaped, so that its successor is forked after
        the reap (as gunicorn: murder, reap, then manage)."""
        return self.replaceable() or (self.killed() and self.stop_sent_at is None)

    def replaceable(self) -> bool:
        """Booting or serving, and staying: a reload, retire or recycle may replace it."""
        return self.state in (WorkerState.BOOTING, WorkerState.READY)

    def serving(self) -> bool:
        """Ready and staying (READY is only reached through mark_ready)."""
        return self.state is WorkerState.READY

    def outgoing(self) -> bool:
        return self.state is WorkerState.OUTGOING

    def taking_requests(self) -> bool:
        """Ready and not told to stop: outgoing workers serve until their successors are ready."""
        return self.ready and self.state in (WorkerState.READY, WorkerState.OUTGOING)

    def stopping(self) -> bool:
        """Told to stop, or being killed: on its way out."""
        return self.state in (WorkerState.STOPPING, WorkerState.KILLED)

    def stopping_gracefully(self) -> bool:
        return self.state is WorkerState.STOPPING

    def killed(self) -> bool:
        """It needed SIGABRT or SIGKILL."""
        return self.state is WorkerState.KILLED

    def overdue(self, now: float) -> bool:
        """Told to stop (or killed) and still alive past its deadline."""
        return self.kill_at is not None and now >= self.kill_at

    def exit_expected(self) -> bool:
        """Its exit is no boot failure: it had served, or the master had told it to stop."""
        return self.ready or self.stop_sent_at is not None

    def hung(self, now: float, timeout: float) -> bool:
        """Ready, held to heartbeats, and silent for longer than `timeout` (0: no limit)."""
        return bool(self.heartbeats and timeout and now - self.last_heartbeat > timeout)

    def boot_failure(self, how: str) -> tuple[str, str]:
        """Why it failed to boot (ending with its traceback's last line), and its output."""
        reason = f"worker {self.pid} failed to boot ({how})"
        output = self.boot_error or ""
        cause = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
        if cause:  # the exception line of the traceback names the cause
            reason += f": {cause[:300]}"
        return reason, output

    @property
    def status(self) -> str:
        """The state as `appdctl status` shows it (a killed worker is stopping; a
        standing-by one, paused)."""
        if self.killed():
            return WorkerState.STOPPING.value
        if self.paused and self.taking_requests():
            return "paused"
        return self.state.value

    # --- transitions ---

    def mark_ready(self) -> None:
        self.ready_at = time.monotonic()
        self.last_heartbeat = self.ready_at
        if self.state is WorkerState.BOOTING:
            self.state = WorkerState.READY

    def replace(self, cause: str | None = None) -> None:
        """Mark it to be stopped once a successor is ready (reload, retire, recycle);
        `cause` names why in the worker exits metric."""
        if self.replaceable():
            self.state = WorkerState.OUTGOING
            self.stop_cause = cause

    def keep(self) -> None:
        """Undo replace(): a reload was aborted, the old worker stays."""
        if self.state is WorkerState.OUTGOING:
            self.state = WorkerState.READY if self.ready else WorkerState.BOOTING
            self.stop_cause = None

    def stop(self, signum: int, grace: float) -> None:
        """Ask the worker to stop; it is SIGKILLed if still alive after `grace` seconds."""
        now = time.monotonic()
        if self.stop_sent_at is None:
            self.stop_sent_at = now
        if not self.killed():
            self.state = WorkerState.STOPPING
        self.kill_at = min(self.kill_at or now + grace, now + grace)
        self.kill(signum)

    def force(self, signum: int, grace: float = 2.0) -> None:
        """SIGABRT (hung) or SIGKILL now; SIGKILL after `grace` if that was not enough."""
        self.state = WorkerState.KILLED
        self.kill_at = time.monotonic() + grace
        self.kill(signum)

    # --- the worker's reports and signals ---

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
                self.mark_ready()
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
            if PAUSED_REPORT in fields:
                self.paused = fields[PAUSED_REPORT] == "1"
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

    def describe(self) -> dict:
        described = {"pid": self.pid, "state": self.status, "started_at": self.started_wall,
                     "requests": self.requests}
        if self.busy is not None:
            # A sync worker cannot report while it serves: it sent when its request began.
            age = time.time() - self.request_start if self.request_start is not None else self.request_age
            described.update(busy=self.busy, request_age_s=round(max(0.0, age), 3))
        return described

    def close(self) -> None:
        self.sock.close()
