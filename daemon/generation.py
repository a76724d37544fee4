"""The daemon's handle on one generation: a master process started by
posix_spawn (fork + exec of a fresh interpreter), its channel, its output,
the last worker table it reported, and its lifecycle state. It exports and
adopts its own part of the daemon's state across a daemon re-exec."""

from __future__ import annotations

import collections
import os
import shutil
import socket
import sys
import time
from enum import StrEnum

from .channel import Channel
from .messages import KIND, ToMaster
from .probation import Outcomes

_TAIL_LINES = 40


class GenerationState(StrEnum):
    """starting -> ready -> serving -> draining -> exited, or starting -> failed.
    A watched upgrade (canary.py) adds: starting -> canary (serving beside the
    old generation) -> serving, and serving -> standby (no workers accepting,
    the master ready to resume) -> serving or draining. The values are what
    status reports."""

    STARTING = "starting"  # master spawned, workers booting
    READY = "ready"        # every worker ready; not yet cut over to
    SERVING = "serving"
    DRAINING = "draining"  # told to drain or stop; finishing in-flight work
    EXITED = "exited"
    FAILED = "failed"      # exited before it served, or was rolled back
    CANARY = "canary"      # a few new workers serving beside the old generation
    STANDBY = "standby"    # the old generation during probation: ready to resume


STARTING, READY, SERVING, DRAINING, EXITED, FAILED, CANARY, STANDBY = GenerationState


def resolve_python(python: str) -> str:
    """The interpreter path, resolved now (so a `current -> releases/N` swap is seen)."""
    found = python if os.sep in python else shutil.which(python)
    if not found or not os.access(found, os.X_OK):
        raise FileNotFoundError(f"python interpreter {python!r} not found or not executable")
    return found


class Generation:
    def __init__(self, number: int, daemon_pid: int, now: float | None = None):
        self.id = number
        self.daemon_pid = daemon_pid
        self.pid = 0
        self.state = STARTING
        self.started_at = time.time()
        self.started_mono = time.monotonic() if now is None else now
        self.ready_at: float | None = None
        self.channel: Channel | None = None
        self.output_fd = -1
        self.tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._partial = b""
        self.snapshot: dict = {"workers": [], "ready": 0, "target": 0, "phase": "booting"}
        self.exit_status: str | None = None
        self.rolled_back = False  # drained because it failed to become ready: ends as "failed"
        self.extra_env: dict = {}  # upgrade --env it was started with
        self.outcomes = Outcomes()  # requests, 5xx, crashes it had (probation and status)

    def spawn(self, loop, python: str, settings: dict, target: int, environment: dict, on_message) -> None:
        """Start the master; `environment` names the listeners and the handoff channel
        and carries upgrade --env."""
        ours, theirs = socket.socketpair()
        out_r, out_w = os.pipe()
        env = {**os.environ, **environment, "APPD_GENERATION": str(self.id), "APPD_DAEMON_PID": str(self.daemon_pid),
               "APPD_CHANNEL_FD": str(theirs.fileno()), "PYTHONUNBUFFERED": "1"}
        os.set_inheritable(theirs.fileno(), True)
        try:
            executable = resolve_python(python)
            self.pid = os.posix_spawn(
                executable, [executable, "-m", "appd.master"], env,
                file_actions=[(os.POSIX_SPAWN_DUP2, out_w, 1), (os.POSIX_SPAWN_DUP2, out_w, 2),
                              (os.POSIX_SPAWN_CLOSE, out_r)],
                setsid=True)
        except OSError as exc:
            for fd in (out_r, out_w):
                os.close(fd)
            ours.close()
            raise OSError(f"cannot start generation {self.id} with {python}: {exc.strerror or exc}") from None
        finally:
            theirs.close()
        os.close(out_w)
        self.adopt(loop, ours.detach(), out_r, on_message)
        self.channel.send({KIND: ToMaster.CONFIG, "settings": settings, "target": target})

    # --- across a daemon re-exec ---

    def export_state(self, now: float) -> dict:
        return {"id": self.id, "pid": self.pid, "state": str(self.state), "started_at": self.started_at,
                "age": now - self.started_mono,
                "ready_age": None if self.ready_at is None else now - self.ready_at,
                "channel_fd": self.channel.sock.fileno() if self.channel and not self.channel.closed else -1,
                "output_fd": self.output_fd, "snapshot": self.snapshot, "tail": list(self.tail),
                "env": self.extra_env, "outcomes": self.outcomes.to_state()}

    @classmethod
    def from_state(cls, entry: dict, daemon_pid: int, now: float, loop, on_message) -> "Generation":
        generation = cls(entry["id"], daemon_pid)
        generation.pid, generation.started_at = entry["pid"], entry["started_at"]
        generation.state = GenerationState(entry["state"])
        generation.started_mono = now - entry["age"]
        generation.ready_at = None if entry["ready_age"] is None else now - entry["ready_age"]
        generation.snapshot = entry["snapshot"]
        generation.extra_env = entry.get("env", {})
        generation.outcomes = Outcomes(entry.get("outcomes"))
        generation.tail.extend(entry["tail"])
        generation.adopt(loop, entry["channel_fd"], entry["output_fd"], on_message)
        return generation

    def flush(self) -> None:
        """Send what is buffered for the master, blocking briefly (just before an exec)."""
        if self.channel and not self.channel.closed:
            self.channel.flush_pending(timeout=1.0)

    def adopt(self, loop, channel_fd: int, output_fd: int, on_message) -> None:
        """Take over a running generation's descriptors (daemon re-exec in place)."""
        if channel_fd >= 0:
            sock = socket.socket(fileno=channel_fd)
            self.channel = Channel(loop, sock, lambda ch, msg: on_message(self, msg), lambda ch, why: None)
        if output_fd >= 0:
            self.output_fd = output_fd
            os.set_blocking(output_fd, False)
            loop.add_reader(output_fd, lambda mask: self._read_output(loop))

    def _read_output(self, loop) -> bool:
        """Forward what the generation printed to our stderr and keep its tail; True if any."""
        try:
            data = os.read(self.output_fd, 65536)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            loop.remove(self.output_fd)
            os.close(self.output_fd)
            self.output_fd = -1
            return False
        try:
            sys.stderr.buffer.write(data)
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()[-4096:]
        self.tail.extend(line.decode("utf-8", "replace") for line in lines)
        return True

    def last_lines(self, count: int = 20) -> str:
        lines = list(self.tail)[-count:]
        if self._partial:
            lines.append(self._partial.decode("utf-8", "replace"))
        return "\n".join(lines)

    def send(self, message: dict) -> None:
        if self.channel is not None:
            self.channel.send(message)

    # --- lifecycle ---

    @property
    def alive(self) -> bool:
        return self.state not in (EXITED, FAILED)

    @property
    def starting(self) -> bool:
        return self.state in (STARTING, READY)

    def mark_ready(self) -> None:
        """Its master said every worker is ready (a later message changes nothing)."""
        if self.state == STARTING:
            self.state = READY

    def serve(self, now: float) -> None:
        self.state = SERVING
        self.ready_at = now

    def exited(self, how: str) -> None:
        """Failed if it never served (or was rolled back), else exited."""
        self.exit_status = how
        self.state = FAILED if self.starting or self.rolled_back else EXITED
        self.snapshot = {**self.snapshot, "workers": []}

    @property
    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.snapshot.get("workers", [])]

    def close(self, loop) -> None:
        """Forget the channel; take what the master printed last (its traceback) first.
        The output pipe stays registered until EOF while orphaned workers still hold it."""
        if self.channel is not None:
            self.channel.close("generation exited")
        while self.output_fd >= 0 and self._read_output(loop):
            pass

    def describe(self, processes) -> dict:
        workers = []
        now = time.time()
        for worker in self.snapshot.get("workers", []):
            rss, cpu = processes(worker["pid"])
            workers.append({"pid": worker["pid"], "state": worker["state"],
                            "age": round(now - worker["started_at"], 1), "requests": worker["requests"],
                            "rss_bytes": rss, "cpu_percent": cpu,
                            "busy": worker.get("busy"), "request_age_s": worker.get("request_age_s")})
        return {"id": self.id, "state": self.state, "master_pid": self.pid, "started_at": self.started_at,
                "ready_workers": self.snapshot.get("ready", 0), "workers": workers,
                "replaced": self.snapshot.get("replaced", []), **self.outcomes.status(workers)}
