"""The gthread worker: `threads` threads serve requests, and neither an idle
client nor a slow one holds a thread.

How a request finds a thread (leader/followers): every connection sits in one
epoll set, registered one-shot. Idle threads wait in epoll_wait on that set;
the kernel wakes one of them per ready connection, and that thread reads it
without blocking, serves it if a whole head is there, and arms it again. No
connection travels from a poller to a thread and back, so a keep-alive request
costs epoll_wait, recv, send and the re-arm: no queue, no wake byte, no second
poller pass. Ready connections wait for a free thread in the kernel's ready
list, first come first served. While requests are quick only one thread waits
in epoll (the others would wake with it and fight for the GIL); once a request
is seen blocking, all do for a while (appd.workers.baton). A head not complete
within `header_timeout` is answered 408. The main thread accepts (while the
worker holds fewer than `worker_connections`), takes handed-on connections,
heartbeats, reads the master's orders and ends idle connections at their
deadlines. Pipelined requests are served in order by the thread that has the
connection.

Who owns a connection: while it waits in epoll it is in `parked`, and whoever
pops it from there owns it (a thread woken for it, or the main thread ending
it); a wakeup for a connection someone else took is stale and ignored.

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
import itertools
import os
import select
import selectors
import threading
import time

from .. import handoff
from ..access import RequestLog
from ..http.wsgi import READ_TIMEOUT
from .base import Worker
from .baton import Baton
from ..http.kept import CLOSED, END, SERVED, Kept, Service
from .sync import server_info

_ACCEPT_ERRORS = (errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR)
POLL_INTERVAL = 0.25  # deadlines (keep-alive, header_timeout) are checked this often
STOP_MARGIN = 0.5     # close what is left this long before the master's SIGKILL
WAIT_READABLE = select.EPOLLIN | select.EPOLLONESHOT
# Writable is at once: for a connection with work in hand and nothing to read
# (a handed-on one with its request, a TLS or PROXY setup to do in a thread).
WAKE_NOW = select.EPOLLOUT | select.EPOLLONESHOT
BATCH = 8          # ready connections a thread takes at once (see run_thread)
SLOW_TURN = 0.005  # a thread on one request this long gives the rest of its batch back


class ThreadWorker(Worker):
    TAKES_HANDOFF = True  # the master may hand this worker's idle connections on when it stops
    handing_off = False   # stopping, and idle connections go to the handoff channel
    looping = False       # in serve()'s loop, which acts on a stop signal
    stop_asked = False    # a stop signal came; the loop has not acted on it yet

    def serve(self) -> None:
        self.setup_threads()
        try:
            self.looping = True  # from here a stop signal is only recorded (see _graceful)
            while self.alive:
                if self.stop_asked:
                    self.begin_stop()
                    break
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
            self.end_threads()

    def setup_threads(self) -> None:
        cfg = self.cfg
        self.threads = cfg.threads
        self.keepalive = cfg.keepalive
        self.header_timeout = cfg.header_timeout or READ_TIMEOUT  # 0: only the read timeout
        access_log = RequestLog(self)
        self.access_log = access_log if access_log else None  # asked once, not per request
        self.epoll = select.epoll()
        self.parked: dict[int, Kept] = {}           # fd -> connection waiting in epoll
        self.open: set[Kept] = set()                # every connection, parked or in a thread
        self.max_connections = self.connection_limit(cfg.worker_connections)
        self.count_lock = threading.Lock()
        # Requests are counted under the lock, one at a time, when something acts on
        # each one (max_requests, request hooks, the access log); else each thread's
        # next() on a shared counter (one C call, atomic under the GIL) and the
        # main thread folds them into self.requests (tally).
        self.served = itertools.count()
        self.tallies = 0
        self.counted_apart = not (self.max_requests or self.access_log)
        on_request = self.served.__next__ if self.counted_apart else self.count_request_locked
        self.service = Service(self.app, self.access_log, self.keepalive, self.header_timeout, on_request,
                               self.should_continue, self.still_serving)
        self.handoff = handoff.Channel.from_env()
        self.handing_off = False
        self.handed_on = 0
        self.last_expiry = 0.0
        self.threads_done = False
        self.batches: list = []  # per thread: [when its current request began, ready ones not begun, tid]
        self.watching = False    # wake every SLOW_TURN: a batch is held, or the baton holder serves
        self.baton = Baton()
        # Level-triggered, so one byte wakes every thread at the end.
        self.stop_r, self.stop_w = os.pipe()
        self.epoll.register(self.stop_r, select.EPOLLIN)
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.selector.register(self.reporter.sock, selectors.EVENT_READ, ("orders", None))
        self.listening = [(l.sock, server_info(l, cfg, multithread=True), l.name) for l in self.listeners]
        self.accepting = False
        self.pool = [threading.Thread(target=self.run_thread, name=f"appd-worker_{i}", daemon=True)
                     for i in range(self.threads)]
        for thread in self.pool:  # last: the limits above are logged as early as before
            thread.start()
        self.set_accepting(not self.paused)
        if self.paused:
            self.pause_changed(True)

    def end_threads(self) -> None:
        """Each thread ends after the connection in hand (the process exits meanwhile
        if one hangs: the threads are daemons)."""
        self.threads_done = True
        os.write(self.stop_w, b"\0")
        self.baton.end()
        self.selector.close()

    def poll_once(self) -> None:
        timeout = min(self.until_next_heartbeat(), POLL_INTERVAL)
        if self.watching:
            timeout = min(timeout, SLOW_TURN)
        orders = False
        for key, _ in self.wait_readable(self.selector, timeout):
            if key.data is None:
                continue
            kind, value = key.data
            if kind == "orders":
                orders = True  # after this batch: a pause hands on connections it may name
            elif not self.alive or self.stop_asked or self.paused:
                continue  # told to stop (or to stand by) while waiting: take nothing new
            elif kind == "listener":
                self.accept(key.fileobj, *value)
            else:
                self.take_handed()
        if orders:
            self.check_orders()
        self.give_back_stuck()
        self.expire()

    # --- connections: coming in, waiting, ending (main thread) ---

    def connections(self) -> int:
        return len(self.open)

    def accept(self, sock, info, name, everything: bool = False) -> None:
        """Accept one connection (or everything queued, on drain). One at a time, so
        that a burst of keep-alive clients spreads over the workers: each wakes for
        the listener and takes its turn, and a busy one (its main thread waits for
        the GIL) takes fewer. Taking all that wait would tie them all to one worker
        for as long as they stay."""
        while everything or self.connections() < self.max_connections:
            try:
                conn, addr = sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS or self.accept_failed(exc) is not None:
                    return
                raise
            kept = Kept(conn, addr, info, name)
            kept.head_until = time.monotonic() + self.header_timeout
            self.adopt(kept, at_once=kept.needs_thread)
            if not everything:
                return

    def take_handed(self) -> None:
        """Connections another worker handed on: as if accepted, with what it had read."""
        if self.handoff is None:
            return
        room = max(0, self.max_connections - self.connections())
        for handed in self.handoff.receive(room if self.sweep else min(room, 1)):  # one: as accept()
            info, name = self.listener_info(handed.listener)
            if self.counts is not None:
                self.counts.handed_off(f"{info.server_name}:{info.server_port}")
            kept = Kept(handed.sock, handed.peer, info, name, pending=handed.data)
            kept.idle_until = time.monotonic() + self.keepalive
            self.adopt(kept, at_once=bool(handed.data))

    def listener_info(self, name: str):
        for _, info, listener in self.listening:
            if listener == name:
                return info, name
        _, info, listener = self.listening[0]
        return info, listener

    def adopt(self, kept: Kept, at_once: bool) -> None:
        """A new connection joins the epoll set; at_once: a thread takes it now."""
        self.open.add(kept)
        self.parked[kept.fd] = kept
        try:
            self.epoll.register(kept.fd, WAKE_NOW if at_once else WAIT_READABLE)
        except OSError:  # a thread holding a stale wakeup for this fd took it and closed it
            pass

    def take_parked(self, kept: Kept) -> bool:
        """The main thread takes a parked connection (to end it or hand it on);
        False if a thread has it now."""
        if self.parked.get(kept.fd) is not kept:
            return False
        return self.parked.pop(kept.fd, None) is kept

    def end(self, kept: Kept, answer_timeout: bool = False) -> None:
        """Close a connection this thread owns (the main thread or a serving one)."""
        if answer_timeout:
            kept.answer_timeout()
        else:
            kept.close()
        self.release(kept)

    def expire(self) -> None:
        now = time.monotonic()
        if now - self.last_expiry < 0.1:
            return
        self.last_expiry = now
        for kept in list(self.parked.values()):
            why = kept.expired(now)
            if why and self.take_parked(kept):
                self.end_late(kept, why, now)

    def end_late(self, kept: Kept, why: str, now: float) -> None:
        """A deadline passed while the connection waited in epoll: end it (idle: close;
        head: 408), unless the client sent more while every thread was busy. Then
        read it here, as a poller would: a whole request waits for a thread with no
        deadline, the start of a head gets its header_timeout."""
        if kept.input_waiting():
            if not kept.reads_without_blocking:
                return self.park(kept)  # a thread reads it; the deadline is checked again
            kept.reader.read_now()
            if kept.reader.eof and not kept.request_ready():
                return self.end(kept)
            kept.head_started(now, self.header_timeout)
            if kept.expired(now) is None:
                return self.park(kept)
            why = "head"
        self.end(kept, answer_timeout=why == "head")

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
        if not hasattr(self, "selector") or not self.alive or self.stop_asked:  # not serving yet (serve()
            return                                # applies it), or stopping: the stop decides handoff
        if paused:
            self.set_accepting(False)
            self.handing_off = self.handoff is not None and self.reporter.pause_hands_off
            if self.handing_off:
                self.pass_on_parked()
        else:
            self.handing_off = False  # the poller's loop accepts again

    def nudge(self) -> None:
        """Wake the main thread (a stop waits for the last connection; a full worker
        may accept again)."""
        try:
            self.wake_w.send(b"\0")
        except OSError:
            pass  # already woken

    # --- connections in the threads ---

    def run_thread(self) -> None:
        """Take up to BATCH ready connections at a time: while this thread serves
        them, a wakeup of an idle thread finds nothing and sleeps on in the kernel
        instead of contending for the GIL. Should one request be slow, the main
        thread gives the rest back to the others (give_back_stuck). The baton
        says when this thread may wait in epoll."""
        poll, parked, monotonic = self.epoll.poll, self.parked, time.monotonic
        turn = [0.0, collections.deque(), threading.get_native_id()]  # see self.batches
        self.batches.append(turn)
        rest, baton = turn[1], self.baton
        while not self.threads_done:
            if baton.holder is not turn:  # the holder goes on polling without a call
                baton.take(turn)
            try:
                rest.extend(poll(-1, BATCH))
            except InterruptedError:
                continue
            if not self.watching and (len(rest) > 1 or baton.holder is turn):
                self.watching = True
                self.nudge()
            while True:
                try:
                    fd, _ = rest.popleft()  # the main thread may empty it meanwhile
                except IndexError:
                    break
                kept = parked.pop(fd, None)
                if kept is not None:  # else stale: someone else took it meanwhile
                    turn[0] = monotonic()
                    self.take(kept)
            turn[0] = 0.0

    def give_back_stuck(self) -> None:
        """Every SLOW_TURN while a thread serves: if one is blocked in its request
        (not merely waiting for a CPU), every thread polls for a while (the baton),
        however short the wait: a 1 ms database call must not queue the others.
        A thread serving one connection for longer than SLOW_TURN gives back the
        ready connections it took but has not begun: armed again for the others."""
        now = time.monotonic()
        holder = self.baton.holder  # may block in a request: then the others must serve
        self.watching = bool(holder and holder[0]) or any(rest for _, rest, _ in self.batches)
        for began, rest, thread_id in self.batches:
            if not began:
                continue
            self.baton.check(thread_id, now - began, now)
            if now - began > SLOW_TURN:
                while True:
                    try:
                        fd, _ = rest.popleft()
                    except IndexError:
                        break
                    kept = self.parked.get(fd)
                    if kept is not None:  # else taken meanwhile, by whoever holds it now
                        self.park(kept)

    def take(self, kept: Kept) -> None:
        """The connection woke this thread: it serves what it has (Kept.turn), then
        goes back into epoll, on to another worker, or is closed. One function, not
        three: it runs for every request."""
        try:
            ended = kept.turn(self.service)
            if ended is CLOSED:
                self.release(kept)
            elif ended is END:
                self.end(kept)
            elif not (ended is SERVED and self.handing_off and self.pass_on(kept)):
                self.parked[kept.fd] = kept  # as park(kept, at_once=False)
                try:
                    self.epoll.modify(kept.fd, WAIT_READABLE)
                except (OSError, ValueError):  # taken and closed meanwhile, or the worker is ending
                    pass
        except BaseException:  # e.g. the app's sys.exit(): the thread must live on
            self.log.exception("connection_failed")
            self.end(kept)

    def park(self, kept: Kept, at_once: bool | None = None) -> None:
        """Back into epoll until readable, or at once if it has work in hand that no
        readiness will announce (at_once None: ask it). The main thread may take it
        (to end it or hand it on) before the re-arm: then the re-arm fails or wakes
        nobody useful."""
        if at_once is None:
            at_once = kept.wants_turn()
        self.parked[kept.fd] = kept
        try:
            self.epoll.modify(kept.fd, WAKE_NOW if at_once else WAIT_READABLE)
        except (OSError, ValueError):  # taken and closed meanwhile, or the worker is ending
            pass

    def release(self, kept: Kept) -> None:
        """A closed connection leaves the count."""
        self.open.discard(kept)
        if not self.alive or not self.accepting:  # stopping, or may accept again
            self.nudge()

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
        batches = getattr(self, "batches", None)  # set when serve() begins
        if not batches:  # heartbeats while booting or gated, before serve()
            return 0, 0.0
        began = [b for b in (turn[0] for turn in batches) if b]  # each read once: threads change them
        return len(began), (time.monotonic() - min(began) if began else 0.0)

    def heartbeat(self, now: float | None = None) -> None:
        self.tally()
        super().heartbeat(now)

    def tally(self) -> None:
        """self.requests from the threads' shared counter (main thread; the next()
        here counts too, hence tallies)."""
        if getattr(self, "counted_apart", False):  # False while booting, before serve()
            self.requests = next(self.served) - self.tallies
            self.tallies += 1

    def count_request_locked(self) -> None:
        with self.count_lock:
            self.count_request()
            if self.max_requests and self.recycling() and not self.handing_off:
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
                self.pass_on_parked()
            self.heartbeat()
            self.poll_once()
        left = self.connections()
        for kept in list(self.parked.values()):
            if self.take_parked(kept):
                self.end(kept)
        self.tally()  # the last requests, for the worker_exit hook's worker.nr
        self.log.info("worker_stopped", handed_on=self.handed_on, left_at_graceful_timeout=left)

    def _graceful(self, signum, frame) -> None:
        """Recorded for serve()'s loop (woken by the signal's wakeup fd), which decides
        the handoff and then stops. Not decided here: this handler may run inside
        the main thread's read of the master's orders, between taking the HANDOFF=1
        datagram and noting it, and would then see no HANDOFF and let responses say
        `Connection: close` until the loop read it again."""
        if not self.looping:
            if self.serving and (not self.handing_off or self.paused):
                self.handing_off = self.handoff_wanted()
            return super()._graceful(signum, frame)
        self.stop_asked = True

    def begin_stop(self) -> None:
        # The handoff decided before `alive` flips, so no response in between says close.
        if not self.handing_off or self.paused:
            self.handing_off = self.handoff_wanted()
        self.alive = False
        self.looping = False  # a signal from now on acts as before the loop (say, a drain while stopping)

    def pass_on_parked(self) -> None:
        for kept in list(self.parked.values()):
            if self.take_parked(kept) and not self.pass_on(kept):
                self.park(kept)  # serve its next request here instead

    def pass_on(self, kept: Kept) -> bool:
        """Hand one connection we own on; False if it cannot go (channel full, or what
        was read of its next request is not known)."""
        data = kept.unread()
        if data is None:
            return False
        try:  # while the channel holds it, the registration would outlive our close
            self.epoll.unregister(kept.fd)
        except (OSError, ValueError):
            pass
        if not self.handoff.send(kept.sock, data, kept.listener):
            self.handing_off = False  # channel full: serve next requests here, with close
            self.epoll.register(kept.fd, WAKE_NOW if kept.wants_turn() else WAIT_READABLE)
            return False
        kept.close()  # our copy only: the connection itself travels on
        with self.count_lock:
            self.handed_on += 1
        self.release(kept)
        return True

    def sweep_backlog(self) -> None:
        """On drain: take every connection already queued (backlog and handoff
        channel); they are served like the others, bounded by graceful_timeout."""
        for sock, info, name in self.listening:
            self.accept(sock, info, name, everything=True)
        if self.handoff is not None:
            self.take_handed()
