"""A tiny single-threaded event loop: selectors, timers, and signals that only
record themselves and wake the loop (via signal.set_wakeup_fd).

Both the daemon and each master run one. Nothing here blocks but select().
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import signal
import socket
import time
from typing import Callable


class Loop:
    def __init__(self):
        self.selector = selectors.DefaultSelector()
        self.timers: list = []
        self._counter = itertools.count()
        self.signals: list[int] = []
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._wake_r, self._wake_w):
            sock.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wakeup)
        self.running = True
        # Called as on_error(exc, what) when a callback raises; None lets it propagate.
        # The daemon sets it: no exception in a signal, timer or I/O callback may kill it.
        self.on_error: Callable[[BaseException, str], None] | None = None

    # --- signals: the handler records, the loop acts ---

    def catch(self, signums, handler: Callable[[int], None]) -> None:
        """Route `signums` to `handler(signum)`, called from the loop, not the signal handler."""
        self._signal_handler = handler
        for signum in signums:
            signal.signal(signum, self._record)
        signal.set_wakeup_fd(self._wake_w.fileno(), warn_on_full_buffer=False)

    def _record(self, signum, frame) -> None:
        self.signals.append(signum)

    def _drain_wakeup(self, mask: int) -> None:
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass

    # --- I/O and timers ---

    def add_reader(self, fileobj, callback: Callable[[int], None]) -> None:
        """Call `callback(mask)` whenever `fileobj` is readable."""
        self.selector.register(fileobj, selectors.EVENT_READ, callback)

    def set_events(self, fileobj, callback, write: bool) -> None:
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if write else 0)
        self.selector.modify(fileobj, events, callback)

    def remove(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def call_later(self, delay: float, callback: Callable[[], None]) -> list:
        """Run `callback` after `delay` seconds; returns a handle for cancel()."""
        entry = [time.monotonic() + delay, next(self._counter), callback]
        heapq.heappush(self.timers, entry)
        return entry

    @staticmethod
    def cancel(entry) -> None:
        if entry is not None:
            entry[2] = None

    def run_once(self, max_wait: float = 1.0) -> None:
        now = time.monotonic()
        wait = max_wait
        if self.timers:
            wait = max(0.0, min(wait, self.timers[0][0] - now))
        if self.signals:
            wait = 0.0
        for key, mask in self.selector.select(wait):
            self.guarded(key.data, mask)
        while self.signals:
            self.guarded(self._signal_handler, self.signals.pop(0))
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, callback = heapq.heappop(self.timers)
            if callback is not None:
                self.guarded(callback)

    def guarded(self, callback, *args) -> None:
        """Call `callback(*args)` behind on_error, the exception boundary."""
        if self.on_error is None:
            callback(*args)
            return
        try:
            callback(*args)
        except Exception as exc:
            self.on_error(exc, getattr(callback, "__qualname__", repr(callback)))

    def close(self) -> None:
        """Stop the signal wakeups and close the loop's descriptors. A forked worker calls it
        on the master's loop it inherited: closing an epoll fd in the child unregisters
        nothing in the parent, which keeps its own."""
        signal.set_wakeup_fd(-1)
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()
