"""The master of one generation: a fresh interpreter exec'd by the daemon.

It inherits the listeners (APPD_FDS), talks to the daemon over APPD_CHANNEL_FD,
and runs a prefork pool: spawn_workers, reap_workers, murder_workers,
manage_workers. Signal handlers only record; the loop does the work.

Phases: booting -> serving -> stopping -> exit. The generation is *ready*
when `target` workers have loaded the app (and passed ready_check).
"""

from __future__ import annotations

import gc
import itertools
import os
import signal
import socket
import sys
import time
import traceback

from appdctl.protocol import FrameDecoder

from . import app as app_loading
from . import handoff, hooks, metrics
from . import listeners as listeners_mod
from . import log, proc, process_setup
from .channel import Channel
from .loop import Loop
from .messages import KIND, SERVE, ToDaemon, ToMaster, kind_of
from .recycle import REPLACED_CAUSES, Recycler
from .worker_handle import WorkerHandle
from .workers import worker_class

BOOTING, SERVING, STOPPING = "booting", "serving", "stopping"
EXIT_BOOT_FAILED = 3
_MAX_SPAWN_BACKOFF = 10.0


class Master:
    def __init__(self, cfg: dict, target: int, listeners: list, channel_sock: socket.socket,
                 generation: int, daemon_pid: int):
        self.cfg = cfg
        self.target = target
        self.listeners = listeners
        self.generation = generation
        self.daemon_pid = daemon_pid
        self.pid = os.getpid()
        self.phase = BOOTING
        self.workers: dict[int, WorkerHandle] = {}
        self.serials = itertools.count(1)
        self.app = None
        self.reload_state: dict | None = None
        self.spawn_failures = 0
        self.spawn_not_before = 0.0
        self.exit_code = 0
        self.dirty = True
        self.last_report = 0.0
        self.unreported_metrics: dict = {}  # counts of exited workers, not yet sent to the daemon
        self.unreported_exits: list[str] = []
        self.loop = Loop()
        self.log = log.get(role="master")
        self.channel = Channel(self.loop, channel_sock, self.on_daemon_message, self.on_daemon_gone)
        self.server = hooks.ServerView(self)  # what gunicorn-style hooks get as `server`
        self.recycler = Recycler(cfg)

    # --- the story ---

    def run(self) -> int:
        proc.set_title(f"appd: master gen {self.generation}", self.cfg.get("proc_name"))
        self.loop.catch([signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                         signal.SIGUSR1, signal.SIGHUP], self.on_signal)
        if self.generation > 1:  # gunicorn calls it as a USR2 re-exec starts the new master
            self.gunicorn_hook("pre_exec")
        self.gunicorn_hook("nworkers_changed", self.target, None)
        if self.cfg["preload_app"] and not self.preload():
            return EXIT_BOOT_FAILED
        self.gunicorn_hook("on_starting")
        self.gunicorn_hook("when_ready")  # gunicorn: listeners ready, workers not yet spawned
        self.log.info("master_started", workers=self.target, worker_class=self.cfg["worker_class"])
        while self.loop.running:
            self.manage_workers()
            self.report_workers()
            self.loop.run_once(0.25)
            self.reap_workers()
            self.murder_workers()
            self.recycle_workers()
            if self.phase == STOPPING and not self.workers:
                break
        self.report_workers(force=True)
        self.channel.flush_and_close()
        self.gunicorn_hook("on_exit")
        self.log.info("master_exit", code=self.exit_code)
        return self.exit_code

    def preload(self) -> bool:
        try:
            self.app = app_loading.load_app(self.cfg["app"])
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
        return worker_class(self.cfg["worker_class"])

    def spawn_worker(self) -> None:
        serial = next(self.serials)
        self.gunicorn_hook("pre_fork", hooks.HandleView(None, self.server.log, serial))
        parent_sock, child_sock = self.worker_cls.report_sockets(serial)
        pid = os.fork()
        if pid == 0:
            if parent_sock is not child_sock:
                parent_sock.close()
            self._become_worker(child_sock, serial)  # never returns
        if parent_sock is not child_sock:
            child_sock.close()
        parent_sock.setblocking(False)
        handle = WorkerHandle(pid, parent_sock, serial, heartbeats=self.worker_cls.HEARTBEAT)
        self.workers[pid] = handle
        self.loop.add_reader(parent_sock, lambda mask, h=handle: self.on_worker_report(h))
        self.dirty = True

    def _become_worker(self, report_sock: socket.socket, serial: int) -> None:
        code = 1
        try:
            for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                           signal.SIGUSR1, signal.SIGHUP):
                signal.signal(signum, signal.SIG_DFL)
            signal.set_wakeup_fd(-1)
            # Close the master's descriptors in this child only; never unregister
            # from the shared epoll instance.
            self.loop.selector.close()
            self.loop._wake_r.close()
            self.loop._wake_w.close()
            self.channel.sock.close()
            for handle in self.workers.values():
                handle.sock.close()
            worker = self.worker_cls(
                master_pid=self.pid, generation=self.generation, serial=serial,
                listeners=self.listeners, cfg=self.cfg, app=self.app, report_sock=report_sock,
                gated=self.phase == BOOTING)
            code = worker.run()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 0
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)

    def reap_workers(self) -> None:
        for pid, status in proc.reaped_children():
            handle = self.workers.pop(pid, None)
            if handle is None:
                continue
            self.loop.remove(handle.sock)
            handle.read_reports()  # the worker's last counts, flushed as it exited
            handle.close()
            metrics.merge(self.unreported_metrics, handle.unreported)
            if handle.ready:
                self.count_exit(handle, metrics.exit_cause(handle.stop_cause, handle.forced, status == 0))
            self.dirty = True
            handle.exit_status = status
            self.gunicorn_hook("child_exit", hooks.HandleView(handle, self.server.log))
            self.on_worker_exit(handle, proc.describe_exit(status))

    def count_exit(self, handle: WorkerHandle, cause: str) -> None:
        """The worker exits metric, and status' list of why workers were replaced."""
        self.unreported_exits.append(cause)
        if cause in REPLACED_CAUSES:
            self.recycler.record(handle.pid, cause)

    def murder_workers(self) -> None:
        """Kill workers that stopped answering: hung, stuck booting, or slow to stop."""
        now = time.monotonic()
        for handle in list(self.workers.values()):
            if handle.kill_at is not None:
                if now >= handle.kill_at:
                    if not handle.forced:
                        self.log.warning("worker_stop_timeout", worker=handle.pid, detail="SIGKILL")
                    handle.force(signal.SIGKILL)
            elif not handle.ready:
                if self.quiet_ready(handle, now):
                    self.on_worker_ready(handle)
                elif now - handle.spawned_at > self.cfg["boot_timeout"]:
                    handle.boot_error = f"not ready within boot_timeout ({self.cfg['boot_timeout']} s)"
                    self.log.error("worker_boot_timeout", worker=handle.pid)
                    handle.force(signal.SIGKILL)
            elif handle.heartbeats and self.cfg["timeout"] and now - handle.last_heartbeat > self.cfg["timeout"]:
                self.log.error("worker_timeout", worker=handle.pid, timeout=self.cfg["timeout"],
                               detail="SIGABRT, then SIGKILL")
                handle.force(signal.SIGABRT)

    def quiet_ready(self, handle: WorkerHandle, now: float) -> bool:
        """A command worker that never speaks READY=1 counts as ready after ready_delay."""
        delay = self.cfg["ready_delay"]
        return (self.cfg["worker_class"] == "command" and delay > 0
                and now - handle.spawned_at >= delay)

    def manage_workers(self) -> None:
        """Keep `target` incoming workers; retire outgoing ones once enough are ready."""
        if self.phase == STOPPING:
            return
        incoming = [h for h in self.workers.values() if not h.outgoing and h.stop_sent_at is None]
        missing = self.target - len(incoming)
        if self.bounded_surge:  # max_surge: never more than target + max_surge processes
            missing = min(missing, self.target + self.cfg["max_surge"] - len(self.workers))
        if missing > 0 and time.monotonic() >= self.spawn_not_before:
            self.spawn_workers(missing)
        elif missing < 0:
            # Scale down: stop the ones not ready first, then the oldest.
            extra = sorted(incoming, key=lambda h: (h.ready, -h.serial))[:(-missing)]
            for handle in extra:
                self.stop_worker(handle)
            self.dirty = True
        ready = sum(1 for h in incoming if h.ready)
        self.stop_outgoing(ready)
        self.check_progress(ready)

    @property
    def bounded_surge(self) -> bool:
        return 0 < (self.cfg.get("max_surge") or 0) < self.target

    def stop_outgoing(self, ready: int) -> None:
        """Stop replaced workers once their successors are ready: all at once, or with
        max_surge one by one as each successor is ready (never fewer than target serving)."""
        outgoing = sorted((h for h in self.workers.values() if h.outgoing and h.stop_sent_at is None),
                          key=lambda h: h.serial)
        surplus = len(outgoing) if ready >= self.target else 0
        if self.bounded_surge:
            surplus = ready + len(outgoing) - self.target
        for handle in outgoing[:max(0, surplus)]:
            self.stop_worker(handle)
            self.dirty = True

    def check_progress(self, ready: int) -> None:
        if self.phase == BOOTING and ready >= self.target:
            self.phase = SERVING
            self.log.info("generation_ready", workers=ready)
            self.report_workers(force=True)  # the daemon's table is current when it hears "ready"
            for handle in self.workers.values():
                handle.send(SERVE)  # cutover: the gated workers start accepting
            self.channel.send({KIND: ToDaemon.READY})
            self.call_hook("on_ready")
        if self.reload_state and ready >= self.target and not any(h.outgoing for h in self.workers.values()):
            self.finish_reload(ok=True)

    def stop_worker(self, handle: WorkerHandle) -> None:
        """Graceful: finish the request in hand, within graceful_timeout. The workers
        that stay (of the class now configured) take its idle connections if they can."""
        if getattr(self.worker_cls, "TAKES_HANDOFF", False):
            handle.send("HANDOFF=1")
        handle.stop_cause = handle.stop_cause or ("retire" if handle.outgoing else "scale")
        handle.stop(self.worker_cls.GRACEFUL_SIGNAL, self.cfg["graceful_timeout"])

    def stop_workers(self, graceful: bool, sweep: bool = False, timeout: float | None = None,
                     handoff: bool = False) -> None:
        """Stop the generation: graceful (optionally serving the backlog first) or quick.
        handoff: the daemon says the serving generation takes idle connections."""
        self.phase = STOPPING
        cls = self.worker_cls
        if graceful:
            signum, grace = (cls.DRAIN_SIGNAL if sweep else cls.GRACEFUL_SIGNAL), self.cfg["graceful_timeout"]
        else:
            signum, grace = cls.QUICK_SIGNAL, 2.0
        grace = timeout if timeout is not None else grace
        for handle in self.workers.values():
            if graceful and handoff and not sweep:
                handle.send("HANDOFF=1")  # before the signal, so the worker reads it on waking
            handle.stop_cause = handle.stop_cause or "generation_stop"
            handle.stop(signum, grace)
        self.dirty = True

    # --- events ---

    def on_worker_report(self, handle: WorkerHandle) -> None:
        if handle.read_reports():
            self.on_worker_ready(handle)

    def on_worker_ready(self, handle: WorkerHandle) -> None:
        if not handle.ready:
            handle.mark_ready()
        self.dirty = True
        self.spawn_failures = 0
        self.channel.send({KIND: ToDaemon.WORKER_READY, "pid": handle.pid, "ready": self.ready_count(),
                           "target": self.target})

    def on_worker_exit(self, handle: WorkerHandle, how: str) -> None:
        if handle.ready or handle.stop_sent_at is not None:
            level = "info" if handle.stop_sent_at is not None and not handle.forced else "warning"
            getattr(self.log, level)("worker_exited", worker=handle.pid, status=how,
                                     requests=handle.requests)
            return
        reason = f"worker {handle.pid} failed to boot ({how})"
        output = handle.boot_error or ""
        cause = next((line.strip() for line in reversed(output.splitlines()) if line.strip()), "")
        if cause:  # the exception line of the traceback names the cause
            reason += f": {cause[:300]}"
        self.log.error("worker_boot_failed", worker=handle.pid, status=how)
        if self.phase == BOOTING:
            self.channel.send({KIND: ToDaemon.BOOT_FAILED, "reason": reason, "output": output})
            self.exit_code = EXIT_BOOT_FAILED
            # Graceful: workers still booting exit at once, booted ones may hold a request.
            self.stop_workers(graceful=True)
        elif self.reload_state:
            self.abort_reload(reason, output)
        else:
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
            old, self.target = self.target, int(message["target"])
            self.dirty = True
            if self.target != old:
                self.gunicorn_hook("nworkers_changed", self.target, old)
        elif kind == ToMaster.RELOAD:
            self.start_reload(message["settings"])
        elif kind == ToMaster.RETIRE:
            self.retire(int(message["pid"]))
        elif kind == ToMaster.REOPEN_LOGS:
            self.reopen_logs()

    def on_daemon_gone(self, channel, reason: str) -> None:
        if self.phase != STOPPING:
            self.log.warning("daemon_gone", reason=reason, detail="stopping gracefully")
            self.stop_workers(graceful=True)

    # --- operations asked by the daemon ---

    def start_reload(self, settings: dict) -> None:
        if self.phase != SERVING or self.reload_state:
            self.channel.send({KIND: ToDaemon.RELOADED, "ok": False, "reason": f"cannot reload while {self.phase}"})
            return
        self.reload_state = {"previous": self.cfg}
        self.cfg = {**self.cfg, **settings}
        for handle in self.workers.values():
            if handle.stop_sent_at is None:
                handle.outgoing = True
                handle.stop_cause = "reload"
        self.dirty = True
        self.log.info("reload_started", workers=self.target)
        self.gunicorn_hook("on_reload")

    def finish_reload(self, ok: bool, reason: str = "", output: str = "") -> None:
        self.reload_state = None
        self.channel.send({KIND: ToDaemon.RELOADED, "ok": ok, "reason": reason, "output": output})
        self.log.info("reload_finished", ok=ok, reason=reason or None)

    def abort_reload(self, reason: str, output: str) -> None:
        """A new worker failed: stop the new ones, keep the old ones serving, restore the config."""
        self.cfg = self.reload_state["previous"]
        for handle in self.workers.values():
            if handle.outgoing:
                handle.outgoing = False
                handle.stop_cause = None
            elif handle.stop_sent_at is None:
                handle.stop(self.worker_cls.QUICK_SIGNAL, 2.0)
        self.finish_reload(ok=False, reason=reason, output=output)

    def recycle_workers(self) -> None:
        """max_worker_memory / max_worker_lifetime: replace one worker, successor first."""
        if self.phase != SERVING or self.reload_state:
            return
        chosen = self.recycler.choose(self.workers.values(), time.monotonic())
        if chosen is None:
            return
        handle, reason = chosen
        self.log.info("worker_recycled", worker=handle.pid, reason=reason)
        self.recycler.record(handle.pid, reason)
        handle.stop_cause = self.recycler.cause(reason)
        handle.outgoing = True
        self.dirty = True

    def retire(self, pid: int) -> None:
        handle = self.workers.get(pid)
        if handle is None or handle.stop_sent_at is not None or handle.outgoing:
            self.channel.send({KIND: ToDaemon.RETIRED, "ok": False, "pid": pid,
                               "reason": f"no active worker with pid {pid} in generation {self.generation}"})
            return
        handle.outgoing = True
        self.dirty = True
        self.channel.send({KIND: ToDaemon.RETIRED, "ok": True, "pid": pid})

    def reopen_logs(self) -> None:
        log.reopen()
        for handle in self.workers.values():
            handle.kill(signal.SIGUSR1)

    # --- reporting to the daemon ---

    def ready_count(self) -> int:
        return sum(1 for h in self.workers.values() if h.ready and not h.outgoing and h.stop_sent_at is None)

    def report_workers(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self.dirty or now - self.last_report >= 1.0):
            return
        self.dirty = False
        self.last_report = now
        self.report_metrics()
        # Outgoing workers (reload, retire) are still ready and taking requests until told to stop.
        taking_requests = sum(1 for h in self.workers.values() if h.ready and h.stop_sent_at is None)
        self.channel.send({KIND: ToDaemon.WORKERS, "phase": self.phase, "target": self.target,
                           "ready": taking_requests, "replaced": list(self.recycler.replaced),
                           "workers": [h.describe() for h in self.workers.values()]})

    def report_metrics(self) -> None:
        """Pass the request counts workers reported since last time on to the daemon (deltas)."""
        requests, self.unreported_metrics = self.unreported_metrics, {}
        for handle in self.workers.values():
            metrics.merge(requests, handle.unreported)
            handle.unreported = {}
        exits, self.unreported_exits = self.unreported_exits, []
        if requests or exits:
            self.channel.send({KIND: ToDaemon.METRICS, "requests": requests, "exits": exits})

    def call_hook(self, name: str) -> None:
        """appd's own master hooks (on_ready): f(master)."""
        app_loading.call_hook(self.cfg.get(name), self, self.log.bind(hook=name))

    def gunicorn_hook(self, name: str, *args) -> None:
        """gunicorn's master hooks: f(server, ...), with the adapter of hooks.py."""
        hooks.call(self.cfg.get(name), self.log.bind(hook=name), self.server, *args)


def read_config_message(sock: socket.socket, timeout: float = 30.0) -> tuple[dict, list]:
    """Block for the daemon's first message (the config); return it and any that followed."""
    sock.settimeout(timeout)
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("appd master: the daemon closed the channel before sending the config")
        messages = decoder.feed(data)
        if messages:
            return messages[0], messages[1:]


def main() -> int:
    generation = int(os.environ["APPD_GENERATION"])
    daemon_pid = int(os.environ["APPD_DAEMON_PID"])
    channel_sock = socket.socket(fileno=int(os.environ["APPD_CHANNEL_FD"]))
    os.set_inheritable(channel_sock.fileno(), False)  # ours alone: no exec'd worker may hold it
    first, pending = read_config_message(channel_sock)
    cfg, target = first["settings"], first["target"]
    log.configure(cfg["log_format"], cfg["log_level"], cfg["error_log"], generation=generation)
    os.chdir(cfg["chdir"])
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    process_setup.prepare(cfg)  # raw_env, pythonpath, umask, logging, then user/group
    proc.die_with_parent(signal.SIGTERM)
    listeners = listeners_mod.from_generation_env()
    handoff.close_on_exec()  # the channel is for the forked workers, not for programs they exec
    master = Master(cfg, target, listeners, channel_sock, generation, daemon_pid)
    for message in pending:
        master.on_daemon_message(master.channel, message)
    return master.run()


if __name__ == "__main__":
    sys.exit(main())
