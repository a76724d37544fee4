"""What every worker does in its own process: set itself up after fork, load
the app, prove it is ready, serve until told to stop, and exit cleanly.

Signals (sent by the master):
  TERM, HUP   graceful: finish the request in hand, then exit
  USR2        drain: also accept and serve what waits in the backlog, then exit
  INT, QUIT   quick: exit now
  ABRT        hung (timeout): log where it is stuck, then exit
  USR1        reopen log files

Datagrams from the master (notify.py): PAUSE=1 / PAUSE=handoff stand the worker by
(probation: it accepts nothing, hands idle connections on with "handoff", stays
alive and heartbeating with its app loaded); PAUSE=0 resumes it.
"""

from __future__ import annotations

import errno
import faulthandler
import os
import random
import selectors
import signal
import socket
import sys
import time
import traceback

from .. import app as app_loading
from .. import hooks, log, proc
from ..http.proxy import tls_context
from ..metrics import WorkerCounts
from .notify import Reporter

# accept() failing for want of descriptors or buffers: the process is fine, the moment
# is not. Pause accepting (connections wait in the backlog) instead of dying.
RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
_ACCEPT_PAUSE_MIN, _ACCEPT_PAUSE_MAX = 0.05, 1.0
_FD_RESERVE = 32  # descriptors kept for the app, log files and the worker's own sockets


class Worker:
    GRACEFUL_SIGNAL = signal.SIGTERM
    DRAIN_SIGNAL = signal.SIGUSR2
    QUICK_SIGNAL = signal.SIGQUIT
    HEARTBEAT = True

    @staticmethod
    def report_sockets(serial: int) -> tuple[socket.socket, socket.socket]:
        """(master's end, worker's end) of the notify channel."""
        return socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def __init__(self, *, master_pid: int, generation: int, serial: int, listeners: list,
                 cfg: dict, app, report_sock: socket.socket, gated: bool = False):
        self.master_pid = master_pid
        self.gated = gated  # born while the generation boots: accept only after SERVE=1
        self.generation = generation
        self.serial = serial
        self.listeners = listeners
        self.cfg = cfg
        self.app = app
        self.reporter = Reporter(report_sock)
        self.alive = True
        self.serving = False  # until then a stop request ends the worker at once
        self.sweep = False
        self.requests = 0
        # report_outcomes: the daemon watches this generation on probation or as a canary.
        self.counts = WorkerCounts() if (cfg.metrics_bind or cfg.statsd_host
                                         or cfg.get("report_outcomes") or cfg.probation
                                         or cfg.canary_workers) else None
        self.last_busy_report = 0.0
        self.last_heartbeat = 0.0
        self.log = None
        self.accept_pause = 0.0
        self.accept_paused_until = 0.0
        self.accept_failures = 0
        self.view = None  # what gunicorn-style hooks get as `worker`
        self.paused = False  # standing by (PAUSE from the master), as last acknowledged
        limit = cfg.max_requests
        self.max_requests = limit + random.randint(0, cfg.max_requests_jitter) if limit else 0

    # --- lifecycle ---

    def run(self) -> int:
        """The worker's whole life; returns its exit code."""
        self.setup()
        code = self.boot()
        if code:
            return code
        self.serving = True
        if not self.alive:
            return 0
        self.reporter.ready()
        self.log.debug("worker_ready", serial=self.serial)
        if self.gated and not self.wait_for_cutover():
            return 0
        try:
            self.serve()
        finally:
            self.report_counts()  # the last counts must reach the daemon before we exit
            self.call_hook("worker_exit")
        return 0

    def setup(self) -> None:
        proc.die_with_parent(signal.SIGTERM)
        if os.getppid() != self.master_pid:  # the master died before prctl took effect
            os._exit(0)
        proc.set_title(f"appd: worker gen {self.generation}", self.cfg.proc_name)
        self.log = log.get(role="worker")
        self.view = hooks.WorkerView(self)
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._graceful)
        signal.signal(signal.SIGUSR2, self._drain)
        signal.signal(signal.SIGINT, self._quick)
        signal.signal(signal.SIGQUIT, self._quick)
        signal.signal(signal.SIGABRT, self._abort)
        signal.signal(signal.SIGUSR1, lambda *_: log.reopen())
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        self.call_hook("post_fork")

    def boot(self) -> int:
        """Load the app (unless preloaded) and run the ready check; 0 when ready."""
        try:
            if self.app is None:
                self.app = app_loading.load_app(self.cfg.app)
            path = self.cfg.ready_check
            if path:
                ok, status = app_loading.ready_check(self.app, path)
                if not ok:
                    raise app_loading.AppLoadError(f"ready_check GET {path} answered {status!r}")
            tls_context(self.cfg)  # a bad certificate fails the boot, not the first request
            self.view.booted = True
            self.call_hook("post_worker_init")
        except SystemExit:
            raise  # told to stop while booting
        except BaseException:
            return self.fail_boot(traceback.format_exc())
        return 0

    def fail_boot(self, text: str) -> int:
        """Print why the worker cannot serve and tell the master (the rollback reason)."""
        sys.stderr.write(text)
        sys.stderr.flush()
        self.reporter.boot_error(text)
        return 3

    def serve(self) -> None:
        raise NotImplementedError

    def wait_for_cutover(self) -> bool:
        """Wait until the master says the whole generation is ready (SERVE=1), so a
        generation that will be rolled back never answers a request."""
        selector = selectors.DefaultSelector()
        selector.register(self.reporter.sock, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        try:
            while self.alive and self.master_alive():
                self.heartbeat()  # may read SERVE=1 itself: the reporter keeps what it read
                if self.reporter.told_to_serve():
                    return True
                self.wait_readable(selector, self.until_next_heartbeat())
            return False
        finally:
            selector.close()

    # --- helpers for subclasses ---

    def heartbeat(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if now - self.last_heartbeat >= 1.0:
            self.last_heartbeat = now
            self.reporter.heartbeat(self.requests, *self.load_now())
            self.report_counts()
            if self.serving:
                self.check_orders()  # a busy worker may never wait on the notify socket

    def check_orders(self) -> None:
        """Read the master's datagrams; on PAUSE / RESUME, act and acknowledge."""
        self.reporter.read()
        paused = self.reporter.paused
        if paused != self.paused:
            self.paused = paused
            self.pause_changed(paused)
            self.reporter.paused_now(paused)
            self.log.info("worker_paused" if paused else "worker_resumed", requests=self.requests)

    def pause_changed(self, paused: bool) -> None:
        """Stop / start accepting (the serving loop reads self.paused); subclasses that
        hold connections also hand their idle ones on."""

    def stand_by(self) -> None:
        """Paused (a worker that holds no connections): accept nothing, keep heartbeating,
        until resumed, told to stop, or the master is gone. Connections wait in the backlog."""
        selector = selectors.DefaultSelector()
        selector.register(self.reporter.sock, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        try:
            while self.alive and self.paused and self.master_alive():
                self.heartbeat()
                self.wait_readable(selector, self.until_next_heartbeat())
                self.check_orders()
        finally:
            selector.close()

    def report_counts(self) -> None:
        """The request metrics counted since the last report, as one datagram (deltas)."""
        taken = self.counts.take() if self.counts is not None else None
        if taken is not None:
            self.reporter.send("X_APPD_METRICS=" + taken)

    def report_busy(self) -> None:
        """A worker that cannot report while it serves (sync) says when its request began;
        at most twice a second, so a busy worker pays one datagram per half second."""
        now = time.monotonic()
        if now - self.last_busy_report >= 0.5:
            self.last_busy_report = now
            self.reporter.send(f"X_APPD_BUSY=1\nX_APPD_REQUEST_AGE=0\nX_APPD_REQUEST_START={time.time():.3f}")

    def load_now(self) -> tuple:
        """(busy, age of the oldest request in s) for status, or () if not tracked."""
        return ()

    def until_next_heartbeat(self) -> float:
        """How long an idle wait may last so heartbeats stay about a second apart."""
        return max(0.05, self.last_heartbeat + 1.0 - time.monotonic())

    def count_request(self) -> None:
        self.requests += 1
        if self.max_requests and self.requests >= self.max_requests:
            self.log.info("max_requests_reached", requests=self.requests)
            self.alive = False

    def handoff_wanted(self) -> bool:
        """Hand idle connections on when the master said the serving workers take
        them (HANDOFF=1), or when recycling (max_requests: this generation's
        other workers take them). Never on drain: the whole service stops."""
        if getattr(self, "handoff", None) is None or self.sweep:
            return False
        if self.recycling():
            return True
        return self.reporter.orders().get("HANDOFF") == "1"

    def recycling(self) -> bool:
        return bool(self.max_requests) and self.requests >= self.max_requests

    def accept_failed(self, exc: OSError) -> float | None:
        """An accept() error: for EMFILE/ENFILE/ENOBUFS/ENOMEM, log it and return how
        long to pause accepting (doubling up to a second while it lasts); None for
        an error that is not about resources (the caller's to handle)."""
        if exc.errno not in RESOURCE_ERRORS:
            return None
        now = time.monotonic()
        recent = now - self.accept_paused_until < 5.0
        self.accept_pause = min(_ACCEPT_PAUSE_MAX, self.accept_pause * 2) if recent else _ACCEPT_PAUSE_MIN
        self.accept_paused_until = now + self.accept_pause
        self.accept_failures += 1
        if not recent or self.accept_failures % 20 == 1:
            self.log.warning("accept_failed", error=os.strerror(exc.errno), pause_s=self.accept_pause,
                             failures=self.accept_failures, detail="pausing accept; connections wait "
                             "in the backlog")
        return self.accept_pause

    def may_accept(self) -> bool:
        return time.monotonic() >= self.accept_paused_until

    def connection_limit(self, wanted: int) -> int:
        """`wanted` connections, capped by what RLIMIT_NOFILE leaves (one fd each)."""
        import resource
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return wanted
        try:
            in_use = len(os.listdir("/proc/self/fd"))
        except OSError:
            in_use = 16
        room = max(1, soft - in_use - _FD_RESERVE)
        if wanted > room:
            self.log.warning("worker_connections_capped", worker_connections=wanted, capped_to=room,
                             rlimit_nofile=soft, detail="raise the open files limit (ulimit -n, "
                             "LimitNOFILE=) to hold more connections")
            return room
        return wanted

    def master_alive(self) -> bool:
        return os.getppid() == self.master_pid

    def wait_readable(self, selector: selectors.BaseSelector, timeout: float) -> list:
        events = selector.select(timeout)
        try:  # one read: what is left (over 4 KiB of wakeups) wakes the next select
            self.wake_r.recv(4096)
        except (BlockingIOError, InterruptedError):
            pass
        return events

    def call_hook(self, name: str) -> None:
        """post_fork and worker_exit take appd's f(worker) or gunicorn's f(server, worker)
        (by arity, see hooks.py); the others gunicorn's f(worker)."""
        spec = self.cfg.get(name)
        if not spec:
            return
        args = (self.view,)
        if name in ("post_fork", "worker_exit"):
            try:
                two = hooks.positional_arity(hooks.resolve(spec)) >= 2
            except Exception:
                two = False  # hooks.call logs the failure to resolve it
            args = (hooks.WorkerServerView(self), self.view) if two else (self,)
        hooks.call(spec, self.log.bind(hook=name), *args)

    # --- signal handlers: record and wake ---

    def _graceful(self, signum, frame) -> None:
        self.alive = False
        if not self.serving:
            raise SystemExit(0)  # nothing accepted yet: no reason to finish booting

    def _drain(self, signum, frame) -> None:
        self.sweep = True
        self._graceful(signum, frame)

    def _quick(self, signum, frame) -> None:
        self.call_hook("worker_int")
        raise SystemExit(0)

    def _abort(self, signum, frame) -> None:
        self.view.aborted = True
        self.call_hook("worker_abort")
        self.log.error("worker_timeout", detail="no heartbeat within timeout; stack follows")
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        os._exit(1)
