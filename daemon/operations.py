"""Changing operations: each is a small state machine that the daemon drives
with generation messages, generation exits and clock ticks. Only one runs at
a time. Each streams progress to its Responder and ends once, with succeed()
or fail(): the first of them wins, later calls change nothing (a drain that
`stop` takes over, the exception boundary failing an operation that was
ending). Upgrade, Start and Reload are in upgrade.py and reload.py."""

from __future__ import annotations

import os
import signal

from appdctl import protocol

from . import proc, reexec
from .messages import KIND, ToDaemon, ToMaster, kind_of


class Operation:
    name = "operation"
    reloads_service = False  # says RELOADING=1 to systemd when it begins, READY=1 when it ends

    def __init__(self, daemon, responder, args: dict | None = None):
        self.daemon = daemon
        self.responder = responder
        self.args = args or {}
        self.started = daemon.clock()
        self.finished = False

    @property
    def log(self):
        return self.daemon.log.bind(op=self.name)

    def start(self) -> None:
        raise NotImplementedError

    def on_message(self, generation, message: dict) -> None:
        pass

    def on_exit(self, generation) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def on_child_exit(self, pid: int, status: int) -> None:
        """A child that is not a master exited (e.g. a probe this operation started)."""

    def elapsed(self) -> float:
        return round(self.daemon.clock() - self.started, 3)

    def progress(self, name: str, **fields) -> None:
        self.log.info(name, **fields)
        self.responder.event(name, **fields)

    def succeed(self, outcome: str = "done", **result) -> None:
        self.daemon.finish_operation(self, True, outcome, None, {"outcome": outcome, **result})

    def fail(self, code: str, message: str, **extra) -> None:
        self.daemon.finish_operation(self, False, code, {"code": code, "message": message, **extra}, None)


class Scale(Operation):
    """Change the target worker count (+N, -N or N). The daemon keeps the
    target, so it survives reload and upgrade. Done when the serving
    generation has exactly that many ready workers."""

    name = "scale"

    def start(self) -> None:
        daemon = self.daemon
        before = daemon.target
        wanted = self.args["count"] if self.args.get("count") is not None else before + (self.args.get("delta") or 0)
        limit = daemon.cfg.max_workers
        if wanted < 1 or wanted > limit:
            self.fail(protocol.BAD_REQUEST, f"cannot scale to {wanted} workers: the target must be "
                      f"between 1 and max_workers ({limit})", target=before)
            return
        daemon.target = wanted
        self.wanted, self.before = wanted, before
        self.generation = daemon.serving
        self.deadline = self.daemon.clock() + daemon.cfg.boot_timeout + daemon.cfg.graceful_timeout
        if self.generation is None:
            self.succeed(target=wanted, previous=before, note="no serving generation: the target "
                         "applies to the next one")
            return
        self.progress("scaling", previous=before, target=wanted)
        self.generation.send({KIND: ToMaster.SCALE, "target": wanted})

    def on_message(self, generation, message: dict) -> None:
        if generation is not self.generation or kind_of(message) != ToDaemon.WORKERS:
            return
        active = [w for w in message["workers"] if w["state"] != "stopping"]
        if message["ready"] == self.wanted and len(active) == self.wanted:
            self.succeed(target=self.wanted, previous=self.before,
                         seconds=self.elapsed())

    def on_exit(self, generation) -> None:
        if generation is self.generation:
            self.fail(protocol.FAILED, f"generation {generation.id} exited while scaling")

    def tick(self, now: float) -> None:
        if now > self.deadline:
            self.fail(protocol.TIMEOUT, f"{self.wanted} workers were not ready in time; the target stays "
                      f"{self.wanted}", target=self.wanted)


class Retire(Operation):
    """Gracefully replace one worker: a new one is started, and when it is ready
    the old one finishes its request and exits."""

    name = "retire"

    def start(self) -> None:
        pid = self.args["pid"]
        self.pid = pid
        self.generation = next((g for g in self.daemon.generations if g.alive and pid in g.worker_pids), None)
        if self.generation is None:
            self.fail(protocol.FAILED, f"no worker with pid {pid}")
            return
        self.deadline = self.daemon.clock() + self.daemon.cfg.boot_timeout + self.daemon.cfg.graceful_timeout
        self.generation.send({KIND: ToMaster.RETIRE, "pid": pid})

    def on_message(self, generation, message: dict) -> None:
        if generation is not self.generation:
            return
        if kind_of(message) == ToDaemon.RETIRED and not message.get("ok"):
            self.fail(protocol.FAILED, message.get("reason", "cannot retire"))
        elif kind_of(message) == ToDaemon.WORKERS and self.pid not in generation.worker_pids:
            self.succeed(pid=self.pid, generation=generation.id)

    def on_exit(self, generation) -> None:
        if generation is self.generation:
            self.fail(protocol.FAILED, f"generation {generation.id} exited")

    def tick(self, now: float) -> None:
        if now > self.deadline:
            self.fail(protocol.TIMEOUT, f"worker {self.pid} was not replaced in time")


class Shutdown(Operation):
    """drain (graceful: serve the backlog and in-flight requests, then exit 0)
    or stop (quick). The daemon exits once every generation is gone."""

    name = "drain"

    delaying = False  # within drain_delay: not ready, still serving

    def start(self) -> None:
        self.quick = isinstance(self, Stop)
        self.last_progress = 0.0
        delay = 0.0 if self.quick else self.daemon.cfg.drain_delay
        if delay > 0:
            self.delaying = True
            self.daemon.begin_drain_delay(delay)
            self.progress("draining", phase="delay", delay_s=delay)
            return
        self.begin_draining()

    def cut_delay_short(self, why: str) -> None:
        self.log.info("drain_delay_cut_short", by=why)
        self.begin_draining()

    def begin_draining(self) -> None:
        daemon = self.daemon
        self.delaying = False
        timeout = self.args.get("timeout")
        grace = 2.0 if self.quick else (timeout if timeout is not None else daemon.cfg.graceful_timeout)
        daemon.begin_shutdown()
        for generation in [g for g in daemon.generations if g.alive]:
            if self.quick:
                daemon.generations.stop(generation, hard_after=grace)
            else:
                daemon.generations.drain(generation, sweep=True, hard_after=grace + 1.0, timeout=grace)
        self.progress("stopping" if self.quick else "draining", timeout=grace)
        self.maybe_done()

    def tick(self, now: float) -> None:
        if self.delaying:
            left = self.daemon.drain_delay_left()
            if not left:
                self.begin_draining()
            elif now - self.last_progress >= 0.5:
                self.last_progress = now
                self.progress("draining", phase="delay", left_s=round(left, 1))
            return
        if not self.quick and now - self.last_progress >= 0.5:
            self.last_progress = now
            left = sum(len(g.snapshot.get("workers", [])) for g in self.daemon.generations if g.alive)
            self.progress("draining", workers_left=left)

    def on_exit(self, generation) -> None:
        self.maybe_done()

    def maybe_done(self) -> None:
        if not self.delaying and not any(g.alive for g in self.daemon.generations):
            self.succeed(outcome="stopped" if self.quick else "drained",
                         seconds=self.elapsed())
            self.daemon.exit(0)


class Stop(Shutdown):
    """stop: quick shutdown (SIGQUIT semantics)."""

    name = "stop"


class ReexecDaemon(Operation):
    """upgrade --daemon: the daemon execs its own new code in place, keeping
    its PID, listeners, control socket, clients and running generations. The
    new code is first imported in a child; if that fails, nothing changes."""

    name = "upgrade-daemon"
    reloads_service = True  # a re-exec that succeeds says READY=1 from the new code

    def start(self) -> None:
        try:
            state = reexec.pack(self.daemon.export_state())
            self.probe_pid, self.probe_out = reexec.start_probe(state)
        except OSError as exc:
            self.fail(protocol.FAILED, f"daemon re-exec refused, the old daemon keeps running: {exc}")
            return
        self.deadline = self.daemon.clock() + 30.0
        self.progress("probing_new_code", pid=self.probe_pid)

    def on_child_exit(self, pid: int, status: int) -> None:
        if pid != self.probe_pid:
            return
        output = self._read_probe_output()
        if status != 0:
            self.fail(protocol.FAILED, "daemon re-exec refused, the old daemon keeps running: the new code "
                      f"failed to load ({proc.describe_exit(status)})", output=output)
            return
        self.progress("exec")
        client = getattr(self.responder, "client", None)
        reason = reexec.execute(self.daemon, client, getattr(self.responder, "request_id", None))
        self.fail(protocol.FAILED, f"daemon re-exec failed, the old daemon keeps running: {reason}")

    def _read_probe_output(self) -> str:
        chunks = []
        try:
            while chunk := os.read(self.probe_out, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(self.probe_out)
        return b"".join(chunks).decode("utf-8", "replace")[-4000:]

    def tick(self, now: float) -> None:
        if now > self.deadline:
            os.kill(self.probe_pid, signal.SIGKILL)
            self.fail(protocol.FAILED, "daemon re-exec refused: the new code did not load within 30 s")
