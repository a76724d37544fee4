"""The gthread worker: `threads` threads serve requests; the main thread is a
poller that accepts, reads request heads without blocking and keeps idle
keep-alive connections, so neither an idle client nor a slow one holds a
thread. A connection goes to a thread once its head is complete, in one
first-come, first-served line; a head not complete within `header_timeout`
is answered 408. The worker keeps accepting while it holds fewer than
`worker_connections`. Pipelined requests are served in order by the thread
that has the connection.

Stopping (upgrade, reload, scale -N, retire, max_requests, drain) never
closes an idle connection under its client: that races the client's next
request, which is then lost. Instead: stop accepting; requests in progress
finish; pipelined requests already read are answered; idle connections are
handed to the serving workers (appd.handoff) when the master says they take
them, or else each one's next request is served with `Connection: close`;
a connection still idle is closed at its keep-alive deadline or at
graceful_timeout, whichever comes first."""

from __future__ import annotations

import collections
import errno
import queue
import selectors
import threading
import time

from .. import handoff
from ..access import RequestLog
from ..http.wsgi import READ_TIMEOUT
from .base import Worker
from .kept import Kept
from .sync import server_info

_ACCEPT_ERRORS = (errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR)
POLL_INTERVAL = 0.25  # deadlines (keep-alive, header_timeout) are checked this often
STOP_MARGIN = 0.5     # close what is left this long before the master's SIGKILL


class ThreadWorker(Worker):
    TAKES_HANDOFF = True  # the master may hand this worker's idle connections on when it stops
    handing_off = False   # stopping, and idle connections go to the handoff channel

    def serve(self) -> None:
        self.setup_poller()
        try:
            while self.alive:
                if not self.master_alive():
                    self.log.warning("master_gone", detail="stopping")
                    self.alive = False
                    break
                self.heartbeat()
                self.poll_once()
                self.set_accepting(not self.paused and self.connections() < self.max_connections
                                   and self.may_accept())
            self.stop_serving()
        finally:
            self.selector.close()
            for _ in self.pool:
                self.jobs.put(None)  # each thread ends after its connection in hand

    def setup_poller(self) -> None:
        cfg = self.cfg
        self.threads = cfg.threads
        self.keepalive = cfg.keepalive
        self.header_timeout = cfg.header_timeout or READ_TIMEOUT  # 0: only the read timeout
        # Plain threads on a queue: a ThreadPoolExecutor adds a Future, a work
        # item and a semaphore to every request.
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()   # Kept connections for the threads
        self.pool = [threading.Thread(target=self.run_thread, name=f"appd-worker_{i}", daemon=True)
                     for i in range(self.threads)]
        self.wake_pending = False  # a thread has written the wake byte the poller has not seen
        self.access_log = RequestLog(self)
        self.returned: queue.SimpleQueue = queue.SimpleQueue()  # (kept, keep) from threads
        self.busy = 0                                         # connections handed to threads
        self.serving_since: dict[int, float] = {}             # id(kept) -> when a thread took it
        self.waiting: collections.deque = collections.deque()  # with a request, waiting for a thread
        self.held: dict = {}                                  # socket -> Kept, in the poller
        self.max_connections = self.connection_limit(cfg.worker_connections)
        self.count_lock = threading.Lock()
        self.handoff = handoff.Channel.from_env()
        self.handing_off = False
        self.handed_on = 0
        self.last_expiry = 0.0
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.selector.register(self.reporter.sock, selectors.EVENT_READ, ("orders", None))
        self.listening = [(l.sock, server_info(l, cfg, multithread=True), l.name) for l in self.listeners]
        self.accepting = False
        for thread in self.pool:  # last: the limits above are logged as early as before
            thread.start()
        self.set_accepting(not self.paused)
        if self.paused:
            self.pause_changed(True)

    def poll_once(self) -> None:
        timeout = min(self.until_next_heartbeat(), POLL_INTERVAL)
        events = self.wait_readable(self.selector, timeout)
        self.wake_pending = False  # before take_returned(): a later return writes again
        orders = False
        for key, _ in events:
            if key.data is None:
                continue
            kind, value = key.data
            if kind == "kept":
                self.on_readable(value)
            elif kind == "orders":
                orders = True  # after this batch: a pause hands on connections it may name
            elif not self.alive or self.paused:
                continue  # told to stop (or to stand by) while waiting: take nothing new
            elif kind == "listener":
                self.accept(key.fileobj, *value)
            else:
                self.take_handed()
        if orders:
            self.check_orders()
        self.take_returned()
        self.dispatch()
        self.expire()

    # --- connections in the poller ---

    def connections(self) -> int:
        return self.busy + len(self.waiting) + len(self.held)

    def accept(self, sock, info, name, everything: bool = False) -> None:
        """Accept while below worker_connections (or everything queued, on drain)."""
        while everything or self.connections() < self.max_connections:
            try:
                conn, addr = sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS or self.accept_failed(exc) is not None:
                    return
                raise
            kept = Kept(conn, addr, info, name)
            kept.head_until = time.monotonic() + self.header_timeout
            if kept.needs_thread:
                self.waiting.append(kept)
            else:
                self.watch(kept)

    def take_handed(self) -> None:
        """Connections another worker handed on: as if accepted, with what it had read."""
        if self.handoff is None:
            return
        for handed in self.handoff.receive(max(0, self.max_connections - self.connections())):
            info, name = self.listener_info(handed.listener)
            if self.counts is not None:
                self.counts.handed_off(f"{info.server_name}:{info.server_port}")
            kept = Kept(handed.sock, handed.peer, info, name, pending=handed.data)
            kept.idle_until = time.monotonic() + self.keepalive
            self.watch(kept)
            if handed.data:
                self.on_readable(kept)

    def listener_info(self, name: str):
        for _, info, listener in self.listening:
            if listener == name:
                return info, name
        _, info, listener = self.listening[0]
        return info, listener

    def watch(self, kept: Kept) -> None:
        self.held[kept.sock] = kept
        self.selector.register(kept.sock, selectors.EVENT_READ, ("kept", kept))

    def forget(self, kept: Kept) -> None:
        del self.held[kept.sock]
        self.selector.unregister(kept.sock)

    def on_readable(self, kept: Kept) -> None:
        if kept.needs_thread:
            self.forget(kept)
            self.waiting.append(kept)
        elif not kept.read():
            self.forget(kept)
            kept.close()
        elif kept.has_request:
            self.forget(kept)
            self.waiting.append(kept)
        else:
            kept.head_started(time.monotonic(), self.header_timeout)

    def expire(self) -> None:
        now = time.monotonic()
        if now - self.last_expiry < 0.1:
            return
        self.last_expiry = now
        for kept in list(self.held.values()):
            why = kept.expired(now)
            if why:
                self.forget(kept)
                if why == "head":
                    kept.answer_timeout()
                else:
                    kept.close()

    def set_accepting(self, accepting: bool) -> None:
        """Listen (and take handed-on connections) only below worker_connections,
        so a full worker leaves connections to others."""
        if accepting == self.accepting:
            return
        self.accepting = accepting
        sources = [(sock, ("listener", (info, name))) for sock, info, name in self.listening]
        if self.handoff is not None:
            sources.append((self.handoff, ("handoff", None)))
        for source, data in sources:
            if accepting:
                self.selector.register(source, selectors.EVENT_READ, data)
            else:
                self.selector.unregister(source)

    def pause_changed(self, paused: bool) -> None:
        """Stand by: accept nothing (listeners nor handed-on connections), hand idle
        connections on as a stopping worker does, answer requests in progress and
        pipelined ones; the ones that cannot move (TLS) are served here. Resume: accept again."""
        if not hasattr(self, "selector") or not self.alive:  # not serving yet (serve() applies it),
            return                                             # or stopping: the stop decides handoff
        if paused:
            self.set_accepting(False)
            self.handing_off = self.handoff is not None and self.reporter.pause_hands_off
            if self.handing_off:
                self.pass_on_held()
        else:
            self.handing_off = False  # the poller's loop accepts again

    # --- connections in the threads ---

    def dispatch(self) -> None:
        """Hand connections with a complete head to free threads, oldest first."""
        while self.waiting and self.busy < self.threads:
            self.busy += 1
            kept = self.waiting.popleft()
            self.serving_since[id(kept)] = time.monotonic()
            self.jobs.put(kept)

    def run_thread(self) -> None:
        while (kept := self.jobs.get()) is not None:
            try:
                self.run_connection(kept)
            except BaseException:  # e.g. the app's sys.exit(): the thread must live on
                self.log.exception("connection_failed")

    def run_connection(self, kept: Kept) -> None:
        keep = False
        try:
            should_continue = self.should_continue if kept.transferable else self.still_serving
            keep = kept.connection.serve(self.app, self.access_log, self.keepalive, should_continue,
                                         self.count_request_locked, park=True, read_ahead=self.still_serving)
        except Exception:
            self.log.exception("connection_failed")
            kept.close()
        finally:
            self.returned.put((kept, keep))
            if not self.wake_pending:  # one wake byte until the poller has woken
                self.wake_pending = True
                try:
                    self.wake_w.send(b"\0")
                except BlockingIOError:
                    pass  # the poller is already woken

    def take_returned(self) -> None:
        while True:
            try:
                kept, keep = self.returned.get_nowait()
            except queue.Empty:
                return
            self.busy -= 1
            self.serving_since.pop(id(kept), None)
            if not keep:
                continue  # closed by the thread
            if kept.has_request or kept.decrypted_waiting:
                # a pipelined request (to serve or refuse), or TLS records already decrypted
                self.waiting.append(kept)
                continue
            kept.hold(time.monotonic(), self.keepalive, self.header_timeout)
            if not (self.handing_off and self.pass_on(kept)):
                self.watch(kept)

    def should_continue(self) -> bool:
        """Whether a response may keep its connection alive: yes while serving, and
        while stopping when the connection will be handed on afterwards."""
        return self.alive or self.handing_off

    def still_serving(self) -> bool:
        """For a connection that cannot be handed on (TLS, PROXY protocol): keep it
        alive only while serving; once stopping, its next response says close."""
        return self.alive
    def load_now(self) -> tuple:
        """(threads serving a connection, age of the longest-served one)."""
        serving_since = getattr(self, "serving_since", None)  # set when serve() begins
        if serving_since is None:  # heartbeats while booting or gated, before serve()
            return 0, 0.0
        oldest = min(serving_since.values(), default=None)
        return self.busy, (time.monotonic() - oldest if oldest is not None else 0.0)

    def count_request_locked(self) -> None:
        with self.count_lock:
            self.count_request()
            if self.recycling() and not self.handing_off:
                self.handing_off = self.handoff_wanted()  # decided before the response is sent

    # --- stopping ---

    def stop_serving(self) -> None:
        self.set_accepting(False)
        deadline = time.monotonic() + max(0.0, self.cfg.graceful_timeout - STOP_MARGIN)
        if self.sweep:
            self.sweep_backlog()
        if not self.handing_off:
            self.handing_off = self.handoff_wanted()
        self.log.debug("worker_stopping", connections=self.connections(), handoff=self.handing_off)
        while self.connections() and time.monotonic() < deadline:
            if self.handing_off:
                self.pass_on_held()
            self.heartbeat()
            self.poll_once()
        left = self.connections()
        for kept in list(self.held.values()):
            self.forget(kept)
            kept.close()
        while self.waiting:
            self.waiting.popleft().close()
        self.log.info("worker_stopped", handed_on=self.handed_on, left_at_graceful_timeout=left)

    def _graceful(self, signum, frame) -> None:
        # Decided before `alive` flips, so no response in between says `Connection: close`.
        if self.serving and (not self.handing_off or self.paused):
            self.handing_off = self.handoff_wanted()
        super()._graceful(signum, frame)

    def pass_on_held(self) -> None:
        for kept in list(self.held.values()):
            self.forget(kept)
            if not self.pass_on(kept):
                self.watch(kept)  # serve its next request here instead

    def pass_on(self, kept: Kept) -> bool:
        """Hand one connection on; False if it cannot go (channel full, or what was
        read of its next request is not known)."""
        data = kept.unread()
        if data is None:
            return False
        if not self.handoff.send(kept.sock, data, kept.listener):
            self.handing_off = False  # channel full: serve next requests here, with close
            return False
        kept.close()  # our copy only: the connection itself travels on
        self.handed_on += 1
        return True

    def sweep_backlog(self) -> None:
        """On drain: take every connection already queued (backlog and handoff
        channel); they are served like the others, bounded by graceful_timeout."""
        for sock, info, name in self.listening:
            self.accept(sock, info, name, everything=True)
        if self.handoff is not None:
            self.take_handed()
