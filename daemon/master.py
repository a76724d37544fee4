"""The master of one generation: a fresh interpreter exec'd by the daemon.

It inherits the listeners (APPD_FDS), talks to the daemon over APPD_CHANNEL_FD,
and runs a prefork pool: spawn_workers, reap_workers, murder_workers,
manage_workers. Signal handlers only record; the loop does the work.

Phases (MasterPhase): booting -> serving -> stopping -> exit. The generation
is *ready* when `target` workers have loaded the app (and passed ready_check).
Each worker's own state is in worker_handle.py; a reload is master_reload.py.
"""

from __future__ import annotations

import enum
import gc
import itertools
import os
import signal
import socket
import sys
import time
import traceback

from . import app as app_loading
from . import hooks, http, log, master_boot, proc
from .channel import Channel
from .config import Settings
from .loop import Loop
from .master_reload import MasterReload
from .messages import KIND, PAUSE_KEY, PAUSED, PAUSED_HANDING_OFF, RESUMED, SERVE, ToDaemon, ToMaster, kind_of
from .master_report import DaemonReport
from .recycle import Recycler
from .worker_fork import MASTER_SIGNALS, fork_worker
from .worker_handle import WorkerHandle
from .workers import worker_class


class MasterPhase(enum.StrEnum):
    BOOTING = "booting"    # workers gated: the generation is not ready yet
    SERVING = "serving"    # ready: the workers accept
    STOPPING = "stopping"  # drain or stop: no more spawning, exit once the workers are gone


EXIT_BOOT_FAILED = 3
_MAX_SPAWN_BACKOFF = 10.0


class Master:
    def __init__(self, cfg: Settings, target: int, listeners: list, channel_sock: socket.socket,
                 generation: int, daemon_pid: int):
        self.cfg = cfg
        self.target = target
        self.listeners = listeners
        self.generation = generation
        self.daemon_pid = daemon_pid
        self.pid = os.getpid()
        self.phase = MasterPhase.BOOTING
        self.workers: dict[int, WorkerHandle] = {}
        self.serials = itertools.count(1)
        self.app = None
        self.reload: MasterReload | None = None
        self.spawn_failures = 0
        self.spawn_not_before = 0.0
        self.exit_code = 0
        self.paused = False  # standing by (probation): the workers stay as they are, accepting nothing
        self.loop = Loop()
        self.log = log.get(role="master")
        self.channel = Channel(self.loop, channel_sock, self.on_daemon_message, self.on_daemon_gone)
        self.server = hooks.ServerView(self)  # what gunicorn-style hooks get as `server`
        self.recycler = Recycler(cfg)
        self.report = DaemonReport(self)

    # --- the story ---

    def run(self) -> int:
        proc.set_title(f"appd: master gen {self.generation}", self.cfg.proc_name)
        self.loop.catch(MASTER_SIGNALS, self.on_signal)
        if self.generation > 1:  # gunicorn calls it as a USR2 re-exec starts the new master
            self.gunicorn_hook("pre_exec")
        self.gunicorn_hook("nworkers_changed", self.target, None)
        if self.cfg.preload_app and not self.preload():
            return EXIT_BOOT_FAILED
        self.gunicorn_hook("on_starting")
        self.gunicorn_hook("when_ready")  # gunicorn: listeners ready, workers not yet spawned
        self.log.info("master_started", workers=self.target, worker_class=self.cfg.worker_class,
                      http_impl=http.IMPL)  # what the forked workers run: compiled or python
        while self.loop.running:
            self.manage_workers()
            self.report.send()
            self.loop.run_once(0.25)
            self.reap_workers()
            self.murder_workers()
            self.recycle_workers()
            if self.phase is MasterPhase.STOPPING and not self.workers:
                break
        self.report.send(force=True)
        self.channel.flush_and_close()
        self.gunicorn_hook("on_exit")
        self.log.info("master_exit", code=self.exit_code)
        return self.exit_code

    def preload(self) -> bool:
        try:
            self.app = app_loading.load_app(self.cfg.app)
        except BaseException:
            text = traceback.format_exc()
            sys.stderr.write(text)
            self.channel.send({KIND: ToDaemon.BOOT_FAILED, "reason": "the app failed to import in the master "
                               "(preload_app)", "output": text})
            self.channel.flush_and_close()
            return False
        gc.collect()
        gc.freeze()  # keep the preloaded objects' pages shared after fork
        return True

    def spawn_workers(self, count: int) -> None:
        for _ in range(count):
            self.spawn_worker()

    @property
    def worker_cls(self):
        return worker_class(self.cfg.worker_class)

    def spawn_worker(self) -> None:
        serial = next(self.serials)
        self.gunicorn_hook("pre_fork", hooks.HandleView(None, self.server.log, serial))
        pid, sock = fork_worker(self, serial, gated=self.phase is MasterPhase.BOOTING)
        handle = WorkerHandle(pid, sock, serial, heartbeats=self.worker_cls.HEARTBEAT)
        self.workers[pid] = handle
        self.loop.add_reader(sock, lambda mask, h=handle: self.on_worker_report(h))
        self.report.dirty = True

    def reap_workers(self) -> None:
        for pid, status in proc.reaped_children():
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            self.loop.remove(handle.sock)
            handle.read_reports()  # the worker's last counts, flushed as it exited
            handle.close()
            self.report.worker_exited(handle, clean=status == 0)
            handle.exit_status = status
            self.gunicorn_hook("child_exit", hooks.HandleView(handle, self.server.log))
            self.on_worker_exit(handle, proc.describe_exit(status))

    def murder_workers(self) -> None:
        """Kill workers that stopped answering: hung, stuck booting, or slow to stop."""
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.stopping():
                if handle.overdue(now):
                    if not handle.killed():
                        self.log.warning("worker_stop_timeout", worker=handle.pid, detail="SIGKILL")
                    handle.force(signal.SIGKILL)
            elif not handle.ready:
                self.check_boot(handle, now)
            elif handle.hung(now, self.cfg.timeout):
                self.log.error("worker_timeout", worker=handle.pid, timeout=self.cfg.timeout,
                               detail="SIGABRT, then SIGKILL")
                handle.force(signal.SIGABRT)

    def check_boot(self, handle: WorkerHandle, now: float) -> None:
        if self.quiet_ready(handle, now):
            self.on_worker_ready(handle)
        elif now - handle.spawned_at > self.cfg.boot_timeout:
            handle.boot_error = f"not ready within boot_timeout ({self.cfg.boot_timeout} s)"
            self.log.error("worker_boot_timeout", worker=handle.pid)
            handle.force(signal.SIGKILL)

    def quiet_ready(self, handle: WorkerHandle, now: float) -> bool:
        """A command worker that never speaks READY=1 counts as ready after ready_delay."""
        delay = self.cfg.ready_delay
        return (self.cfg.worker_class == "command" and delay > 0
                and now - handle.spawned_at >= delay)

    def manage_workers(self) -> None:
        """Keep `target` incoming workers; retire outgoing ones once enough are ready.
        Not while paused: the standing-by workers are kept exactly, to resume without a boot."""
        if self.phase is MasterPhase.STOPPING or self.paused:
            return
        incoming = [h for h in self.workers.values() if h.counts_toward_target()]
        missing = self.target - len(incoming)
        if self.bounded_surge:  # max_surge: never more than target + max_surge processes
            missing = min(missing, self.target + self.cfg.max_surge - len(self.workers))
        if missing > 0 and time.monotonic() >= self.spawn_not_before:
            self.spawn_workers(missing)
        elif missing < 0:
            # Scale down: stop the ones not ready first, then the oldest.
            extra = sorted(incoming, key=lambda h: (h.ready, -h.serial))[:(-missing)]
            for handle in extra:
                self.stop_worker(handle)
            self.report.dirty = True
        ready = self.ready_count()
        self.stop_outgoing(ready)
        self.check_progress(ready)

    @property
    def bounded_surge(self) -> bool:
        return 0 < self.cfg.max_surge < self.target

    def stop_outgoing(self, ready: int) -> None:
        """Stop replaced workers once their successors are ready: all at once, or with
        max_surge one by one as each successor is ready (never fewer than target serving)."""
        outgoing = sorted((h for h in self.workers.values() if h.outgoing()), key=lambda h: h.serial)
        surplus = len(outgoing) if ready >= self.target else 0
        if self.bounded_surge:
            surplus = ready + len(outgoing) - self.target
        for handle in outgoing[:max(0, surplus)]:
            self.stop_worker(handle)
            self.report.dirty = True

    def check_progress(self, ready: int) -> None:
        if self.phase is MasterPhase.BOOTING and ready >= self.target:
            self.declare_ready(ready)
        if self.reload:
            self.reload.progress(ready)

    def declare_ready(self, ready: int) -> None:
        self.phase = MasterPhase.SERVING
        self.log.info("generation_ready", workers=ready)
        self.report.send(force=True)  # the daemon's table is current when it hears "ready"
        for handle in self.workers.values():
            handle.send(SERVE)  # cutover: the gated workers start accepting
        self.channel.send({KIND: ToDaemon.READY})
        self.call_hook("on_ready")

    def stop_worker(self, handle: WorkerHandle) -> None:
        """Graceful: finish the request in hand, within graceful_timeout. The workers
        that stay (of the class now configured) take its idle connections if they can."""
        if getattr(self.worker_cls, "TAKES_HANDOFF", False):
            handle.send("HANDOFF=1")
        handle.stop_cause = handle.stop_cause or ("retire" if handle.outgoing() else "scale")
        handle.stop(self.worker_cls.GRACEFUL_SIGNAL, self.cfg.graceful_timeout)

    def stop_workers(self, graceful: bool, sweep: bool = False, timeout: float | None = None,
                     handoff: bool = False) -> None:
        """Stop the generation: graceful (optionally serving the backlog first) or quick.
        handoff: the daemon says the serving generation takes idle connections."""
        self.phase = MasterPhase.STOPPING
        cls = self.worker_cls
        if graceful:
            signum, grace = (cls.DRAIN_SIGNAL if sweep else cls.GRACEFUL_SIGNAL), self.cfg.graceful_timeout
        else:
            signum, grace = cls.QUICK_SIGNAL, 2.0
        grace = timeout if timeout is not None else grace
        for handle in self.workers.values():
            if graceful and handoff and not sweep:
                handle.send("HANDOFF=1")  # before the signal, so the worker reads it on waking
            handle.stop_cause = handle.stop_cause or "generation_stop"
            handle.stop(signum, grace)
        self.report.dirty = True

    # --- events ---

    def on_worker_report(self, handle: WorkerHandle) -> None:
        paused = handle.paused
        if handle.read_reports():
            self.on_worker_ready(handle)
        if handle.paused != paused:
            self.report.dirty = True  # status shows it paused (or not) at once

    def on_worker_ready(self, handle: WorkerHandle) -> None:
        if not handle.ready:
            handle.mark_ready()
        self.report.dirty = True
        self.spawn_failures = 0
        self.channel.send({KIND: ToDaemon.WORKER_READY, "pid": handle.pid, "ready": self.ready_count(),
                           "target": self.target})

    def on_worker_exit(self, handle: WorkerHandle, how: str) -> None:
        if handle.exit_expected():
            level = "info" if handle.stopping_gracefully() else "warning"
            getattr(self.log, level)("worker_exited", worker=handle.pid, status=how,
                                     requests=handle.requests)
            return
        reason, output = handle.boot_failure(how)
        self.log.error("worker_boot_failed", worker=handle.pid, status=how)
        if self.phase is MasterPhase.BOOTING:
            self.channel.send({KIND: ToDaemon.BOOT_FAILED, "reason": reason, "output": output})
            self.exit_code = EXIT_BOOT_FAILED
            # Graceful: workers still booting exit at once, booted ones may hold a request.
            self.stop_workers(graceful=True)
        elif self.reload:
            self.reload.abort(reason, output)
        else:
            self.back_off_spawning()

    def back_off_spawning(self) -> None:
        """Workers that fail to boot are respawned ever more slowly, up to _MAX_SPAWN_BACKOFF."""
        self.spawn_failures += 1
        delay = min(_MAX_SPAWN_BACKOFF, 0.1 * 2 ** self.spawn_failures)
        self.spawn_not_before = time.monotonic() + delay
        self.log.error("respawn_backoff", seconds=delay, failures=self.spawn_failures)

    def on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap_workers()
        elif signum == signal.SIGTERM:
            self.log.info("stopping", how="graceful")
            self.stop_workers(graceful=True)
        elif signum in (signal.SIGINT, signal.SIGQUIT):
            self.log.info("stopping", how="quick")
            self.stop_workers(graceful=False)
        elif signum == signal.SIGUSR1:
            self.reopen_logs()

    def on_daemon_message(self, channel, message) -> None:
        kind = kind_of(message)
        if kind == ToMaster.DRAIN:
            self.log.info("draining", sweep=bool(message.get("sweep")), timeout=message.get("timeout"))
            self.stop_workers(graceful=True, sweep=bool(message.get("sweep")), timeout=message.get("timeout"),
                              handoff=bool(message.get("handoff")))
        elif kind == ToMaster.STOP:
            self.stop_workers(graceful=False)
        elif kind == ToMaster.SCALE:
            self.scale(int(message["target"]))
        elif kind == ToMaster.RELOAD:
            self.start_reload(message["settings"])
        elif kind == ToMaster.RETIRE:
            self.retire(int(message["pid"]))
        elif kind == ToMaster.REOPEN_LOGS:
            self.reopen_logs()
        elif kind in (ToMaster.PAUSE, ToMaster.RESUME):
            self.set_paused(kind == ToMaster.PAUSE, handoff=bool(message.get("handoff")))

    def on_daemon_gone(self, channel, reason: str) -> None:
        if self.phase is not MasterPhase.STOPPING:
            self.log.warning("daemon_gone", reason=reason, detail="stopping gracefully")
            self.stop_workers(graceful=True)

    # --- operations asked by the daemon ---

    def scale(self, target: int) -> None:
        """manage_workers does the work: spawns, or stops the least useful workers."""
        old, self.target = self.target, target
        self.report.dirty = True
        if target != old:
            self.gunicorn_hook("nworkers_changed", target, old)

    def set_paused(self, paused: bool, handoff: bool = False) -> None:
        """Stand by (probation): every worker stops accepting and, with `handoff`, hands its
        idle kept-alive connections to the serving generation, but stays alive with its app
        loaded, so resuming costs no boot (and runs the code it loaded, not what is on disk now)."""
        if paused == self.paused or self.phase is MasterPhase.STOPPING:
            return
        self.paused = paused
        value = RESUMED
        if paused:
            value = PAUSED_HANDING_OFF if handoff and getattr(self.worker_cls, "TAKES_HANDOFF", False) else PAUSED
        self.log.info("paused" if paused else "resumed", workers=len(self.workers))
        for handle in self.workers.values():
            handle.send(f"{PAUSE_KEY}={value}")
        self.report.dirty = True

    def start_reload(self, settings: dict) -> None:
        if self.phase is not MasterPhase.SERVING or self.reload or self.paused:
            why = "paused" if self.paused else self.phase
            self.channel.send({KIND: ToDaemon.RELOADED, "ok": False, "reason": f"cannot reload while {why}"})
            return
        self.reload = MasterReload(self, settings)
        self.reload.start()

    def recycle_workers(self) -> None:
        """max_worker_memory / max_worker_lifetime: replace one worker, successor first."""
        if self.phase is not MasterPhase.SERVING or self.reload or self.paused:
            return
        chosen = self.recycler.choose(self.workers.values(), time.monotonic())
        if chosen is None:
            return
        handle, reason = chosen
        self.log.info("worker_recycled", worker=handle.pid, reason=reason)
        self.recycler.record(handle.pid, reason)
        handle.replace(cause=self.recycler.cause(reason))
        self.report.dirty = True

    def retire(self, pid: int) -> None:
        handle = self.workers.get(pid)
        if handle is None or not handle.replaceable():
            self.channel.send({KIND: ToDaemon.RETIRED, "ok": False, "pid": pid,
                               "reason": f"no active worker with pid {pid} in generation {self.generation}"})
            return
        handle.replace()
        self.report.dirty = True
        self.channel.send({KIND: ToDaemon.RETIRED, "ok": True, "pid": pid})

    def reopen_logs(self) -> None:
        log.reopen()
        for handle in self.workers.values():
            handle.kill(signal.SIGUSR1)

    # --- reporting to the daemon ---

    def ready_count(self) -> int:
        return sum(1 for h in self.workers.values() if h.serving())

    def call_hook(self, name: str) -> None:
        """appd's own master hooks (on_ready): f(master)."""
        app_loading.call_hook(getattr(self.cfg, name), self, self.log.bind(hook=name))

    def gunicorn_hook(self, name: str, *args) -> None:
        """gunicorn's master hooks: f(server, ...), with the adapter of hooks.py."""
        hooks.call(getattr(self.cfg, name), self.log.bind(hook=name), self.server, *args)


def main() -> int:
    boot = master_boot.prepare()
    master = Master(boot.cfg, boot.target, boot.listeners, boot.channel_sock, boot.generation,
                    boot.daemon_pid)
    for message in boot.pending:
        master.on_daemon_message(master.channel, message)
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
