"""The daemon: the service's stable PID. It holds the listeners and the
control socket, keeps the target worker count, starts generations (fresh
masters) and drives one changing operation at a time. It never imports the
application and never touches a request.

Its life: open (fresh) or adopt (re-exec'd in place: from_state) what it
holds, then serve(): accept control clients, read generation messages, reap
children, tick the running operation, until an operation says exit.
Signal handlers only record and wake.

What it delegates: listening sockets to ListenerSet, the control socket to
ControlServer, restarting a generation after a crash to CrashRecovery, the
pidfile to Pidfile, psutil to ProcessUsage, and everything it does to the
outside world (spawn, signal, reap, clock) to an env (env.py), which unit
tests replace.
"""

from __future__ import annotations

import os
import sys
import time
from enum import StrEnum

from appdctl import protocol

from . import __version__, config, handoff, log, proc, signals, status_report, systemd
from .control import ControlServer, LogResponder
from .env import ProcessEnv
from .generation import Generation
from .generations import Generations
from .listener_set import ListenerSet
from .loop import Loop
from .messages import KIND, ToDaemon, ToMaster
from .metrics import MetricsState
from .operations import Shutdown, Stop
from .pidfile import Pidfile
from .recovery import CrashRecovery
from .reexec import STATE_VERSION
from .upgrade import Start
from .usage import ProcessUsage

# Settings only the daemon uses; a master gets everything else.
_DAEMON_ONLY = {"config", "bind", "backlog", "unix_socket_mode", "pidfile", "control_socket", "control_socket_mode",
                "control_socket_group", "control_allow_uids", "control_allow_gids", "python"}
# Variables meant for the daemon alone, not for generations.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")


class DaemonState(StrEnum):
    """The daemon's lifecycle; the values are what status reports."""

    STARTING = "starting"          # the first generation boots
    RUNNING = "running"
    CRASHLOOPING = "crashlooping"  # generations keep dying; recovery backs off
    DRAINING = "draining"          # drain_delay: reports not ready, still serves
    STOPPING = "stopping"          # drain or stop: generations finish, then the daemon exits


def internal_message(exc: BaseException) -> str:
    """The exception's type and message, bounded (the message may quote a huge input)."""
    try:
        text = str(exc)
    except Exception:
        text = "(unprintable)"
    if len(text) > 500:
        text = text[:500] + f"... ({len(text)} characters)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Daemon:
    def __init__(self, cfg: config.Config, flags: dict, environ: dict | None = None, env=None):
        self.cfg = cfg
        self.flags = flags
        self.environ = dict(os.environ if environ is None else environ)  # as we started: sd_notify's
        self.env = env or ProcessEnv()
        self.clock = self.env.clock
        self.target = cfg.workers
        self.pid = os.getpid()
        self.started = self.clock()
        self.loop = Loop()
        self.loop.on_error = self.internal_error
        self.log = log.get(role="daemon")
        self.state = DaemonState.STARTING
        self.reexecuted = False
        self.exit_code: int | None = None
        self.listeners = ListenerSet([], self.log)
        self.control: ControlServer | None = None
        self.handoff: handoff.Channel | None = None  # held for the service's life, as the listeners
        self.generations = Generations(self)
        self.generation_env: dict = {}  # upgrade --env of the serving generation: recovery keeps it
        self.operation = None
        self.last_operation: dict | None = None
        self.drain_delay_until: float | None = None  # set while drain_delay runs
        self.recovery = CrashRecovery(self)
        self.metrics = MetricsState()  # request counts etc., continuous across generations and re-execs
        self.usage = ProcessUsage()
        self.health = None  # metrics_bind: /metrics, /livez, /readyz (health_server)
        self.statsd = None  # statsd_host: the same figures over UDP

    # --- birth: fresh, or adopted from the previous image ---

    @classmethod
    def fresh(cls, cfg: config.Config, flags: dict) -> "Daemon":
        """A first start: bind (or take systemd's) listeners, the control socket, the handoff channel."""
        daemon = cls(cfg, flags)
        daemon.listeners = ListenerSet.open_initial(cfg, daemon.log)
        daemon.control = ControlServer(daemon, cfg)
        daemon.handoff = handoff.Channel.create()
        return daemon

    @classmethod
    def from_state(cls, state: dict) -> "Daemon":
        """The daemon the previous image handed over (reexec.read_state): each part adopts its own piece."""
        from .reexec import config_of
        daemon = cls(*config_of(state), environ=state["environ"])
        daemon.reexecuted = True
        daemon.adopt_own_state(state)
        daemon.listeners = ListenerSet.adopt(state["listeners"], daemon.log)
        daemon.handoff = handoff.Channel.adopt(state["handoff"]) if state.get("handoff") else handoff.Channel.create()
        daemon.generations.adopt(state["generations"], state["next_generation"])
        reply = {"outcome": "done", "pid": daemon.pid, "version": __version__}
        daemon.control = ControlServer.adopt(daemon, daemon.cfg, state["control"], state["clients"], reply)
        return daemon

    def adopt_own_state(self, state: dict) -> None:
        self.target = state["target"]
        self.started = self.clock() - (time.time() - state["started_wall"])
        self.last_operation = {"op": "upgrade-daemon", "ok": True, "outcome": "done", "error": None,
                               "duration_s": round(state["operation_age"], 3)}
        self.recovery = CrashRecovery(self, state["crashes"])
        self.metrics = MetricsState(state.get("metrics"))
        self.state = DaemonState(state["state"])
        self.generation_env = state.get("generation_env", {})

    def export_state(self, client=None, request_id=None) -> dict:
        """Everything the next image needs, with fds by number; `client` gets the reply."""
        now = self.clock()
        control, clients = self.control.export_state(client, request_id)
        return {
            "version": STATE_VERSION, "argv": sys.argv, "flags": self.flags,
            "config": {"values": self.cfg.values, "sources": self.cfg.sources}, "environ": self.environ,
            "target": self.target, "started_wall": time.time() - (now - self.started),
            "next_generation": self.generations.next_id, "last_operation": self.last_operation,
            "operation_age": now - self.operation.started if self.operation else 0.0,
            "crashes": self.recovery.crashes, "state": str(self.state), "metrics": self.metrics.to_state(),
            "listeners": self.listeners.export_state(), "generation_env": self.generation_env,
            "control": control, "clients": clients, "handoff": self.handoff.fds(),
            "generations": self.generations.export_state(now),
        }

    def flush_channels(self) -> None:
        """Before an exec: what is buffered for clients and masters goes out."""
        self.control.flush()
        for generation in self.generations:
            generation.flush()

    def shared_fds(self) -> list[int]:
        """Descriptors every generation inherits."""
        return self.listeners.fds() + self.handoff.fds()

    # --- life ---

    def serve(self) -> int:
        """The daemon's life, the same after a fresh start and a re-exec."""
        proc.become_subreaper()
        proc.set_title("appd: daemon")
        self.start_side_servers()
        for key in _PRIVATE_ENV:
            os.environ.pop(key, None)
        self.pidfile = Pidfile(self.cfg.pidfile, self.pid, self.log)
        self.pidfile.write(strict=not self.reexecuted)  # a re-exec'd daemon already serves and goes on
        self.loop.catch(signals.CAUGHT, self.on_signal)
        self.log.info("daemon_reexecuted" if self.reexecuted else "daemon_started", version=__version__,
                      listeners=self.listeners.addresses(), control_socket=self.control.path, workers=self.target)
        if self.reexecuted:
            self.reap()  # children that exited while we were exec'ing
            self.notify("READY=1", self.status_line())
        else:
            self.begin(Start(self, LogResponder(self.log, on_done=self.first_generation_done)))
        watchdog = systemd.watchdog_interval(self.environ)
        if watchdog:
            self.watchdog(watchdog)
        while self.exit_code is None:
            self.loop.run_once(0.25)
            self.loop.guarded(self.reap)
            if self.operation is not None:
                self.drive(self.operation, "tick", self.clock())
            self.loop.guarded(self.control.tick)
        self.shutdown()
        return self.exit_code

    def first_generation_done(self, ok: bool, error: dict | None) -> None:
        if ok:
            self.state = DaemonState.RUNNING
            self.notify("READY=1", self.status_line())
        else:
            self.log.error("start_failed", reason=error.get("reason"), detail="the first generation never "
                           "became ready; see its output above")
            self.exit(1)

    def start_side_servers(self) -> None:
        """statsd_host and metrics_bind. A fresh start refuses a metrics address it
        cannot bind; a re-exec'd daemon already serves and only logs it."""
        if self.cfg.statsd_host:
            from .statsd import StatsdSink
            self.statsd = StatsdSink(self, self.cfg.statsd_host, self.cfg.statsd_prefix)
        try:
            self.health = self.open_metrics_listener(self.cfg.metrics_bind)
        except OSError as exc:
            if not self.reexecuted:
                raise config.ConfigError(f"metrics_bind {self.cfg.metrics_bind}: {exc.strerror or exc}") from exc
            self.log.error("metrics_listener_failed", metrics_bind=self.cfg.metrics_bind, error=str(exc))

    def open_metrics_listener(self, spec: str | None):
        """The metrics_bind server (/metrics, /livez, /readyz) on `spec`, or None."""
        if not spec:
            return None
        from .health_server import HealthServer
        return HealthServer(self, spec)

    def exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code

    def crashlooping(self) -> None:
        self.state = DaemonState.CRASHLOOPING

    def accepts_recovery(self) -> bool:
        return self.state not in (DaemonState.STARTING, DaemonState.STOPPING)

    def begin_drain_delay(self, seconds: float) -> None:
        """Report not ready but keep serving, so load balancers stop routing here first."""
        self.state = DaemonState.DRAINING
        self.drain_delay_until = self.clock() + seconds
        self.recovery.cancel()
        self.notify("STOPPING=1")

    def drain_delay_left(self) -> float | None:
        if self.drain_delay_until is None:
            return None
        return max(0.0, self.drain_delay_until - self.clock())

    def begin_shutdown(self) -> None:
        self.state = DaemonState.STOPPING
        self.drain_delay_until = None
        self.recovery.cancel()
        self.notify("STOPPING=1")

    def not_ready_reason(self) -> str | None:
        """Why the service should get no new traffic (/readyz answers 503), or None when it should."""
        left = self.drain_delay_left()
        if left is not None:
            return f"draining (drain_delay, {left:.0f} s left)"
        if self.state == DaemonState.STOPPING:
            return "stopping" if isinstance(self.operation, Stop) or self.operation is None else "draining"
        if self.serving is None:
            return "no generation is serving"
        return None

    def shutdown(self) -> None:
        self.generations.kill_all()
        self.control.close()
        if self.health is not None:
            self.health.shutdown()
        if self.statsd is not None:
            self.statsd.close()
        self.listeners.close_all()
        self.handoff.close()
        self.pidfile.remove()
        self.log.info("daemon_exit", code=self.exit_code)

    # --- generations (their table is generations.py) ---

    def generation_settings(self) -> dict:
        return {k: v for k, v in self.cfg.values.items() if k not in _DAEMON_ONLY}

    @property
    def serving(self) -> Generation | None:
        return self.generations.serving

    def served_by(self, generation: Generation) -> None:
        """`generation` serves now: its upgrade --env is what recovery starts with."""
        self.generation_env = generation.extra_env
        if self.state == DaemonState.CRASHLOOPING:
            self.state = DaemonState.RUNNING

    def generation_said(self, generation: Generation, kind: str, message: dict) -> None:
        if self.operation is not None:
            self.drive(self.operation, "on_message", generation, message)
        elif kind == ToDaemon.READY and generation.starting:
            self.generations.promote(generation)  # crash recovery's: the only one started outside an operation
            self.log.info("recovered", generation=generation.id)

    def reap(self) -> None:
        for pid, status in self.env.reaped_children():
            self.usage.forget(pid)
            generation = self.generations.by_pid(pid)
            if generation is not None:
                self.generations.exited(generation, proc.describe_exit(status))
            elif self.operation is not None:
                self.drive(self.operation, "on_child_exit", pid, status)

    def generation_ended(self, generation: Generation, how: str, crashed: bool, was_starting: bool) -> None:
        if self.operation is not None:
            self.drive(self.operation, "on_exit", generation)
        running = self.state in (DaemonState.RUNNING, DaemonState.CRASHLOOPING)
        # Only crash recovery starts a generation outside an operation: its failure is a crash too.
        if running and (crashed or (was_starting and self.operation is None)):
            self.recovery.crashed(generation, how, time.time())

    # --- operations ---

    def begin(self, operation) -> bool:
        """Start a changing operation, or refuse with busy. Returns whether it started."""
        takeover = isinstance(operation, Stop) and type(self.operation) is Shutdown
        if takeover:  # stop takes over from a running drain: the operator wants it over now
            self.operation.fail(protocol.FAILED, f"drain interrupted: {operation.name} took over")
        if self.operation is not None:
            operation.responder.fail(protocol.BUSY, f"{self.operation.name} is running "
                                     f"(for {self.clock() - self.operation.started:.1f} s)")
            return False
        if self.state == DaemonState.STOPPING and not takeover:
            operation.responder.fail(protocol.BUSY, "the daemon is stopping")
            return False
        if operation.reloads_service:
            self.recovery.cancel()
            self.notify(*systemd.reloading_lines())
        self.operation = operation
        self.drive(operation, "start")
        return True

    def drive(self, operation, step: str, *args) -> None:
        """One step of an operation behind the exception boundary: an exception ends
        the operation failed (internal) rather than leaving it stuck, which would
        answer every later command busy, or killing the daemon."""
        try:
            getattr(operation, step)(*args)
        except Exception as exc:
            self.internal_error(exc, f"{operation.name}.{step}")
            for stuck in {operation, self.operation} - {None}:
                if not stuck.finished:
                    stuck.fail(protocol.INTERNAL, internal_message(exc), where=f"{operation.name}.{step}")

    def internal_error(self, exc: BaseException, where: str, responder=None) -> None:
        """The exception boundary of the daemon: log with the traceback, answer the
        client that asked (code internal, type and message), keep serving."""
        self.log.error("internal_error", where=where, error=internal_message(exc), exc_info=exc)
        if responder is None:
            return
        operation = self.operation
        if operation is not None and operation.responder is responder and not operation.finished:
            operation.fail(protocol.INTERNAL, internal_message(exc), where=where)
        elif not getattr(responder, "replied", False):
            responder.fail(protocol.INTERNAL, internal_message(exc), where=where)

    def finish_operation(self, operation, ok: bool, outcome: str, error: dict | None, result: dict | None):
        """An operation's end (the first of its succeed()/fail() calls): answer, record, recover."""
        if operation.finished:
            return
        operation.finished = True
        if self.operation is operation:
            self.operation = None
        duration = self.clock() - operation.started
        self.last_operation = {"op": operation.name, "ok": ok, "outcome": outcome,
                               "error": error["message"] if error else None, "duration_s": round(duration, 3)}
        self.metrics.operation_done(operation.name, outcome, duration)
        if ok:
            operation.responder.done(result or {})
        else:
            operation.responder.fail(error["code"], error["message"],
                                     **{k: v for k, v in error.items() if k not in ("code", "message")})
        if operation.reloads_service and self.state != DaemonState.STOPPING:
            self.notify("READY=1", self.status_line())
        self.recovery.ensure_serving()

    # --- config ---

    def read_config(self) -> config.Config:
        return config.load(self.flags, self.environ)

    def apply_config(self, cfg: config.Config, target: int) -> None:
        self.cfg = cfg
        self.target = target

    # --- signals: the same operations the control commands use (signals.py) ---

    def on_signal(self, signum: int) -> None:
        signals.handle(self, signum)

    def reopen_logs(self) -> list[str]:
        """Reopen log files everywhere; the daemon's files that cannot be reopened
        (directory removed...) keep their old descriptor and are named in the result."""
        errors = log.reopen()
        for error in errors:
            self.log.error("reopen_logs_failed", error=error)
        self.generations.send_all({KIND: ToMaster.REOPEN_LOGS})
        return errors

    # --- status ---

    def status(self) -> dict:
        return status_report.status(self)

    def status_line(self) -> str:
        return status_report.status_line(self)

    def notify(self, *lines: str) -> None:
        """sd_notify, from the environment we started with (generations do not inherit it)."""
        systemd.notify(*lines, environ=self.environ)

    def watchdog(self, interval: float) -> None:
        self.notify("WATCHDOG=1")
        self.loop.call_later(interval, lambda: self.watchdog(interval))
