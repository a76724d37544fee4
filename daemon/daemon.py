"""The daemon: the service's stable PID. It holds the listeners and the
control socket, keeps the target worker count, starts generations (fresh
masters) and drives one changing operation at a time. It never imports the
application and never touches a request.

Its loop: accept control clients, read generation messages, reap children,
tick the running operation. Signal handlers only record and wake.
"""

from __future__ import annotations

import os
import signal
import time

from appdctl import protocol

from . import __version__, config, handoff, listeners as listeners_mod, log, pidfile, proc, reexec, systemd
from .control import ControlServer, LogResponder
from .generation import DRAINING, EXITED, FAILED, READY, SERVING, Generation
from .loop import Loop
from .metrics import MetricsState
from .probation import split_failures
from .canary import upgrade_operation
from .operations import Reload, Scale, Shutdown, Start, Stop

# Settings only the daemon uses; a master gets everything else.
_DAEMON_ONLY = {"config", "bind", "backlog", "unix_socket_mode", "pidfile", "control_socket", "control_socket_mode",
                "control_socket_group", "control_allow_uids", "control_allow_gids", "python"}
# Variables meant for the daemon alone, not for generations.
_PRIVATE_ENV = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID",
                "LISTEN_FDNAMES")
_CRASH_BACKOFF_MAX = 30.0
_STABLE_AFTER = 10.0


def internal_message(exc: BaseException) -> str:
    """The exception's type and message, bounded (the message may quote a huge input)."""
    try:
        text = str(exc)
    except Exception:
        text = "(unprintable)"
    if len(text) > 500:
        text = text[:500] + f"... ({len(text)} characters)"
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


class Daemon:
    def __init__(self, cfg: config.Config, flags: dict):
        self.cfg = cfg
        self.flags = flags
        self.environ = dict(os.environ)
        self.target = cfg.workers
        self.pid = os.getpid()
        self.started = time.monotonic()
        self.loop = Loop()
        self.log = log.get(role="daemon")
        self.listeners: list = []
        self.handoff: handoff.Channel | None = None  # held for the service's life, as the listeners
        self.generations: list[Generation] = []
        self.next_generation = 1
        self.operation = None
        self.last_operation: dict | None = None
        self.state = "starting"
        self.exit_code: int | None = None
        self.crashes: list[dict] = []
        self.recovery_timer = None
        self.drain_delay_until: float | None = None  # set while drain_delay runs
        self.generation_env: dict = {}  # upgrade --env of the serving generation: recovery keeps it
        self._processes: dict = {}
        self.metrics = MetricsState()  # request counts etc., continuous across generations and re-execs
        self.health = None  # metrics_bind: /metrics, /livez, /readyz (health_server)
        self.statsd = None  # statsd_host: the same figures over UDP
        self.loop.on_error = self.internal_error

    # --- life ---

    def run(self, state: dict | None = None) -> int:
        """The daemon's life. `state` is set when the previous image re-exec'd us in place."""
        proc.become_subreaper()
        proc.set_title("appd: daemon")
        if state is not None:
            reexec.restore(self, state)
        else:
            inherited = listeners_mod.from_systemd()
            self.listeners = listeners_mod.initial_listeners(
                self.cfg.bind, self.bind_explicit(self.cfg), self.cfg.backlog, inherited,
                unix_mode=self.cfg.unix_socket_mode)
            self.control = ControlServer(self, self.cfg)
        self.handoff = self.handoff or handoff.Channel.create()
        self.start_health_server(reexecuted=state is not None)
        for key in _PRIVATE_ENV:
            os.environ.pop(key, None)
        self.write_pidfile(reexecuted=state is not None)
        self.loop.catch([signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM,
                         signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGCHLD], self.on_signal)
        self.log.info("daemon_reexecuted" if state else "daemon_started", version=__version__,
                      listeners=[l.address for l in self.listeners], control_socket=self.control.path,
                      workers=self.target)
        if state is not None:
            self.reap()  # children that exited while we were exec'ing
            self.notify("READY=1", self.status_line())
        else:
            self.start_first_generation()
        watchdog = systemd.watchdog_interval(self.environ)
        if watchdog:
            self.watchdog(watchdog)
        while self.exit_code is None:
            self.loop.run_once(0.25)
            self.loop.guarded(self.reap)
            if self.operation is not None:
                self.drive(self.operation, "tick", time.monotonic())
            self.loop.guarded(self.control.tick)
        self.shutdown()
        return self.exit_code

    def start_first_generation(self) -> None:
        first = Start(self, LogResponder(self.log, on_done=self._first_generation_done))
        self.operation = first
        self.drive(first, "start")

    def _first_generation_done(self, ok: bool, error: dict | None) -> None:
        if ok:
            self.state = "running"
            self.notify("READY=1", self.status_line())
        else:
            self.log.error("start_failed", reason=error.get("reason"), detail="the first generation never "
                           "became ready; see its output above")
            self.exit(1)

    def start_health_server(self, reexecuted: bool) -> None:
        if self.cfg.statsd_host:
            from .statsd import StatsdSink
            self.statsd = StatsdSink(self, self.cfg.statsd_host, self.cfg.statsd_prefix)
        if not self.cfg.metrics_bind:
            return
        from .health_server import HealthServer
        try:
            self.health = HealthServer(self, self.cfg.metrics_bind)
        except OSError as exc:
            if not reexecuted:
                raise config.ConfigError(f"metrics_bind {self.cfg.metrics_bind}: {exc.strerror or exc}") from exc
            self.log.error("metrics_listener_failed", metrics_bind=self.cfg.metrics_bind, error=str(exc))

    def exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code

    def begin_drain_delay(self, seconds: float) -> None:
        """Report not ready but keep serving, so load balancers stop routing here first."""
        self.state = "draining"
        self.drain_delay_until = time.monotonic() + seconds
        self.loop.cancel(self.recovery_timer)
        self.notify("STOPPING=1")

    def drain_delay_left(self) -> float | None:
        if self.drain_delay_until is None:
            return None
        return max(0.0, self.drain_delay_until - time.monotonic())

    def begin_shutdown(self) -> None:
        self.state = "stopping"
        self.drain_delay_until = None
        self.loop.cancel(self.recovery_timer)
        self.notify("STOPPING=1")

    def not_ready_reason(self) -> str | None:
        """Why the service should get no new traffic (/readyz answers 503), or None when it should."""
        left = self.drain_delay_left()
        if left is not None:
            return f"draining (drain_delay, {left:.0f} s left)"
        if self.state == "stopping":
            return "stopping" if isinstance(self.operation, Stop) or self.operation is None else "draining"
        if self.serving is None:
            return "no generation is serving"
        return None

    def shutdown(self) -> None:
        for generation in self.generations:
            generation.kill(signal.SIGKILL)
        self.kill_stragglers()
        self.control.close()
        if self.health is not None:
            self.health.shutdown()
        if self.statsd is not None:
            self.statsd.close()
        for listener in self.listeners:
            self._close_listener(listener)
        self.handoff.close()
        self.remove_pidfile()
        self.log.info("daemon_exit", code=self.exit_code)

    # --- generations ---

    def generation_settings(self) -> dict:
        return {k: v for k, v in self.cfg.values.items() if k not in _DAEMON_ONLY}

    def start_generation(self, extra_env: dict | None = None, target: int | None = None,
                         settings: dict | None = None) -> Generation:
        """A new generation of `target` workers (default: the daemon's); without `extra_env`
        it gets the serving one's (upgrade --env). `settings` adds to the configured ones."""
        generation = Generation(self.next_generation, self.pid)
        generation.extra_env = dict(self.generation_env if extra_env is None else extra_env)
        generation.spawn(self.loop, self.cfg.python, {**self.generation_settings(), **(settings or {})},
                         target or self.target,
                         self.listeners, {**generation.extra_env, **self.handoff.env()},
                         self.on_generation_message)
        self.next_generation += 1
        self.generations.append(generation)
        self.metrics.count("generations", "started")
        self.log.info("generation_started", generation=generation.id, master=generation.pid)
        return generation

    @property
    def serving(self) -> Generation | None:
        return next((g for g in reversed(self.generations) if g.state == SERVING), None)

    def promote(self, generation: Generation) -> None:
        generation.state = SERVING
        generation.ready_at = time.monotonic()
        self.generation_env = generation.extra_env
        if self.state == "crashlooping":
            self.state = "running"

    def drain_generation(self, generation: Generation, sweep: bool, hard_after: float | None = None,
                         timeout: float | None = None) -> None:
        """Tell a generation to finish in-flight requests and exit; SIGKILL it if it overstays."""
        if not generation.alive:
            return
        generation.state = DRAINING
        # Its idle keep-alive connections go to the serving generation if that one takes them.
        hand_on = (not sweep and self.serving not in (None, generation)
                   and handoff.takes_handoff(self.cfg.worker_class))
        generation.send({"t": "drain", "sweep": sweep, "timeout": timeout, "handoff": hand_on})
        grace = hard_after if hard_after is not None else self.cfg.graceful_timeout + 5.0
        self.loop.call_later(grace, lambda: self._overstayed(generation))

    def stop_generation(self, generation: Generation, hard_after: float) -> None:
        generation.state = DRAINING
        generation.send({"t": "stop"})
        self.loop.call_later(hard_after, lambda: self._overstayed(generation))

    def _overstayed(self, generation: Generation) -> None:
        if generation.alive or generation.worker_pids:
            self.log.warning("generation_killed", generation=generation.id, detail="did not exit in time")
            generation.kill(signal.SIGKILL)

    def on_generation_message(self, generation: Generation, message) -> None:
        # Guarded one by one: an exception must not drop the messages after it in the same read.
        self.loop.guarded(self.handle_generation_message, generation, message)

    def handle_generation_message(self, generation: Generation, message) -> None:
        if not isinstance(message, dict):
            return
        if message.get("t") == "workers":
            generation.snapshot = message
        elif message.get("t") == "metrics":
            requests, failures = split_failures(message.get("requests") or {})
            generation.outcomes.record(requests, failures, message.get("exits"))  # probation's input
            self.metrics.add_requests(requests)
            for cause in message.get("exits") or ():
                self.metrics.count("worker_exits", str(cause))
            return
        elif message.get("t") == "ready" and generation.state not in (SERVING, DRAINING):
            generation.state = READY
        if self.operation is not None:
            self.drive(self.operation, "on_message", generation, message)
        elif message.get("t") == "ready" and generation.state == READY:
            self.recovered(generation)

    def reap(self) -> None:
        for pid, status in proc.reaped_children():
            self._processes.pop(pid, None)
            generation = next((g for g in self.generations if g.pid == pid and g.alive), None)
            if generation is not None:
                self.on_generation_exit(generation, proc.describe_exit(status))
            elif self.operation is not None:
                self.drive(self.operation, "on_child_exit", pid, status)

    def on_generation_exit(self, generation: Generation, how: str) -> None:
        was = generation.state
        generation.exit_status = how
        generation.state = FAILED if was in ("starting", READY) or generation.rolled_back else EXITED
        if generation.state == FAILED:
            self.metrics.count("generations", "rolled_back" if generation.rolled_back else "failed")
        generation.snapshot = {**generation.snapshot, "workers": []}
        generation.close(self.loop)
        self.log.info("generation_exited", generation=generation.id, status=how, was=was,
                      state=generation.state)
        # Orphaned workers (re-parented to us) get SIGTERM from the kernel; kill stragglers later.
        self.loop.call_later(self.cfg.graceful_timeout + 1.0, lambda: self.kill_stragglers(generation.pid))
        self.generations = [g for g in self.generations if g.alive or g is generation][-20:]
        if self.operation is not None:
            self.drive(self.operation, "on_exit", generation)
        if was == SERVING and self.state in ("running", "crashlooping"):
            self.crashed(generation, how)
        elif was in ("starting", READY) and self.operation is None and self.state in ("running", "crashlooping"):
            # Only crash recovery starts a generation outside an operation: its failure is a crash too.
            self.crashed(generation, how)

    def kill_stragglers(self, group: int | None = None) -> None:
        """SIGKILL what is left of exited masters: workers re-parented to us (we are their
        subreaper) that ignored the SIGTERM of their master's death, e.g. hung or stopped
        ones. `group` is an exited master's pid (its process group); None means every
        child's group but ours (at shutdown)."""
        import psutil
        try:
            children = psutil.Process(self.pid).children()
        except psutil.Error:
            return
        groups = set()
        for child in children:
            try:
                groups.add(os.getpgid(child.pid))
            except OSError:
                pass
        groups -= {os.getpgrp(), *(g.pid for g in self.generations if g.alive)}
        for pgid in groups if group is None else groups & {group}:
            self.log.warning("stragglers_killed", group=pgid, detail="left by an exited master")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass

    # --- crash recovery: whenever nothing serves or starts, start a generation ---

    def crashed(self, generation: Generation, how: str) -> None:
        if self.serving is not None or self.starting:
            return
        lived = time.monotonic() - (generation.ready_at or generation.started_mono)
        if lived > _STABLE_AFTER and generation.state == EXITED:
            self.crashes.clear()
        self.crashes.append({"generation": generation.id, "status": how, "at": time.time(),
                             "output": generation.last_lines(5)})
        self.crashes = self.crashes[-10:]
        if len(self.crashes) > 1:
            self.state = "crashlooping"
        self.log.error("master_crashed", generation=generation.id, status=how, restart_in=self.backoff(),
                       crashes=len(self.crashes), state=self.state)
        self.ensure_serving()

    @property
    def starting(self) -> bool:
        return any(g.state in ("starting", READY) for g in self.generations)

    def backoff(self) -> float:
        return 0.0 if len(self.crashes) <= 1 else min(_CRASH_BACKOFF_MAX, 0.5 * 2 ** (len(self.crashes) - 1))

    def ensure_serving(self) -> None:
        """Arm recovery when no generation serves or starts: after a crash, and after
        every operation (one may end with nothing serving, e.g. the new master died
        right after cutover while the old one drained). Running operations, a
        stopping daemon and a recovery already armed wait their turn."""
        if (self.serving is not None or self.starting or self.operation is not None
                or self.state in ("starting", "stopping") or self.recovery_timer is not None):
            return
        self.recovery_timer = self.loop.call_later(self.backoff(), self.recover)

    def recover(self) -> None:
        self.recovery_timer = None
        if (self.operation is not None or self.state in ("starting", "stopping") or self.serving is not None
                or self.starting):
            return
        try:
            self.start_generation()
        except OSError as exc:
            self.log.error("recovery_failed", error=str(exc))
            self.recovery_timer = self.loop.call_later(_CRASH_BACKOFF_MAX, self.recover)

    def recovered(self, generation: Generation) -> None:
        self.promote(generation)
        self.log.info("recovered", generation=generation.id)

    # --- operations ---

    def begin(self, operation) -> bool:
        """Start a changing operation, or refuse with busy. Returns whether it started."""
        takeover = isinstance(operation, Stop) and type(self.operation) is Shutdown
        if takeover:  # stop takes over from a running drain: the operator wants it over now
            self.operation.fail(protocol.FAILED, f"drain interrupted: {operation.name} took over")
        if self.operation is not None:
            operation.responder.fail(protocol.BUSY, f"{self.operation.name} is running "
                                     f"(for {time.monotonic() - self.operation.started:.1f} s)")
            return False
        if self.state == "stopping" and not takeover:
            operation.responder.fail(protocol.BUSY, "the daemon is stopping")
            return False
        if operation.reloads_service:
            self.loop.cancel(self.recovery_timer)
            self.recovery_timer = None
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
        if operation.finished:
            return
        operation.finished = True
        if self.operation is operation:
            self.operation = None
        self.last_operation = {"op": operation.name, "ok": ok, "outcome": outcome,
                               "error": error["message"] if error else None,
                               "duration_s": round(time.monotonic() - operation.started, 3)}
        self.metrics.operation_done(operation.name, outcome, time.monotonic() - operation.started)
        if ok:
            operation.responder.done(result or {})
        else:
            operation.responder.fail(error["code"], error["message"],
                                     **{k: v for k, v in error.items() if k not in ("code", "message")})
        if operation.reloads_service and self.state != "stopping":
            self.notify("READY=1", self.status_line())
        self.ensure_serving()

    # --- config ---

    def read_config(self) -> config.Config:
        return config.load(self.flags, self.environ)

    @staticmethod
    def bind_explicit(cfg: config.Config) -> bool:
        return cfg.sources.get("bind", "default") != "default"

    def bind_specs(self, cfg: config.Config) -> list[str]:
        """The listener specs `cfg` asks for. Without an explicit bind, socket-activated
        listeners (fd://N) stay what we serve across reloads."""
        activated = [l.spec for l in self.listeners if l.spec.startswith("fd://")]
        return cfg.bind if self.bind_explicit(cfg) or not activated else activated

    def apply_config(self, cfg: config.Config, target: int, open_listeners: bool = False) -> None:
        if open_listeners:
            self.listeners = listeners_mod.open_listeners(self.bind_specs(cfg), cfg.backlog,
                                                          current=self.listeners, unix_mode=cfg.unix_socket_mode)
        self.cfg = cfg
        self.target = target

    def restore_config(self, cfg, target, old_listeners) -> None:
        self.close_unused_listeners(self.listeners, keep=old_listeners)
        self.listeners = old_listeners
        self.cfg, self.target = cfg, target

    def close_unused_listeners(self, candidates, keep=None) -> None:
        keep_fds = {l.fd for l in (keep if keep is not None else self.listeners)}
        for listener in candidates:
            if listener.fd not in keep_fds:
                self._close_listener(listener)

    def _close_listener(self, listener) -> None:
        try:
            listeners_mod.unlink_owned(listener)
        except OSError as exc:
            self.log.warning("listener_unlink_failed", listener=listener.spec, error=str(exc))
        listener.sock.close()

    # --- signals: the same operations the control commands use ---

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
            return
        responder = LogResponder(self.log, source=signal.Signals(signum).name)
        if signum == signal.SIGHUP:
            self.begin(Reload(self, responder))
        elif signum == signal.SIGUSR2:
            self.begin(upgrade_operation(self, responder, {}))
        elif signum in (signal.SIGTTIN, signal.SIGTTOU):
            self.begin(Scale(self, responder, {"delta": 1 if signum == signal.SIGTTIN else -1}))
        elif signum == signal.SIGTERM and isinstance(self.operation, Shutdown) and self.operation.delaying:
            self.operation.cut_delay_short("a second SIGTERM")
        elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
            shutdown = (Shutdown if signum == signal.SIGTERM else Stop)(self, responder, {})
            if self.operation is not None and not isinstance(self.operation, Shutdown):
                self.operation.fail(protocol.FAILED, f"interrupted by {signal.Signals(signum).name}")
            self.begin(shutdown)
        elif signum == signal.SIGUSR1:
            self.reopen_logs()

    def reopen_logs(self) -> list[str]:
        """Reopen log files everywhere; the daemon's files that cannot be reopened
        (directory removed...) keep their old descriptor and are named in the result."""
        errors = log.reopen()
        for error in errors:
            self.log.error("reopen_logs_failed", error=error)
        for generation in self.generations:
            if generation.alive:
                generation.send({"t": "reopen_logs"})
        return errors

    # --- status ---

    def process_usage(self, pid: int) -> tuple[int, float]:
        import psutil
        process = self._processes.get(pid)
        try:
            if process is None:
                process = self._processes[pid] = psutil.Process(pid)
                process.cpu_percent(None)
            return process.memory_info().rss, process.cpu_percent(None)
        except psutil.Error:
            return 0, 0.0

    def status(self) -> dict:
        status = {
            "daemon": {"pid": self.pid, "version": __version__, "state": self.state,
                       "drain_delay_left_s": _rounded(self.drain_delay_left()),
                       "not_ready": self.not_ready_reason(),
                       "uptime_s": round(time.monotonic() - self.started, 1), "socket": self.control.path,
                       **dict(zip(("rss_bytes", "cpu_percent"), self.process_usage(self.pid))),
                       "metrics_address": self.health.address if self.health else None},
            "target_workers": self.target,
            "listeners": [l.describe() for l in self.listeners],
            "generations": [g.describe(self.process_usage) for g in self.generations if g.alive],
            "last_operation": self.last_operation,
            "operation": self.operation.name if self.operation else None,
            "crashes": self.crashes,
        }
        # Forget the psutil handles of processes no longer listed (they would pile up across upgrades).
        listed = {self.pid} | {w["pid"] for g in status["generations"] for w in g["workers"]}
        for pid in set(self._processes) - listed:
            del self._processes[pid]
        return status

    def status_line(self) -> str:
        serving = self.serving
        ready = serving.snapshot.get("ready", 0) if serving else 0
        last = self.last_operation["outcome"] if self.last_operation else "none"
        return (f"STATUS=generation {serving.id if serving else '-'}, {ready}/{self.target} workers "
                f"ready, last operation: {last}")

    def notify(self, *lines: str) -> None:
        """sd_notify, from the environment we started with (generations do not inherit it)."""
        systemd.notify(*lines, environ=self.environ)

    def watchdog(self, interval: float) -> None:
        self.notify("WATCHDOG=1")
        self.loop.call_later(interval, lambda: self.watchdog(interval))

    # --- pidfile ---

    def write_pidfile(self, reexecuted: bool = False) -> None:
        if not self.cfg.pidfile:
            return
        try:
            pidfile.write(self.cfg.pidfile, self.pid)
        except OSError as exc:
            if not reexecuted:
                raise  # a fresh start refuses; a re-exec'd daemon already serves and must go on
            self.log.error("pidfile_not_written", pidfile=self.cfg.pidfile, error=str(exc))

    def remove_pidfile(self) -> None:
        if self.cfg.pidfile:
            pidfile.remove(self.cfg.pidfile, self.pid)
