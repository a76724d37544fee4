"""Which gthread threads wait in epoll: one, while requests are quick; all, for a
while after one is seen blocking.

Several threads waiting in epoll_wait on one set wake together under a load of
quick requests, and then take turns at the GIL: every recv and send hands it to
another waiting thread (a futex wake and a context switch each). One thread
serving everything does the same work with less CPU. But a request may block
(a database call, a sleep): then the others must serve meanwhile.

So one thread, the holder, waits in epoll and serves what it finds; the others
wait on a condition. While a thread serves, the main thread looks at it every
SLOW_TURN (ThreadWorker.give_back_stuck). If it is blocked in its request,
however briefly (a 1 ms database call is caught as soon as a look falls inside
one), or has computed for longer than SLOW_CPU, a spell begins: for SLOW_SPELL
every thread waits in epoll, as without a baton. Then the first thread back
from its batch holds the baton again, the others wait; should requests still
block, the next spell begins at the next look that finds the holder blocked. A
request arriving while the holder blocks thus waits for a thread about
SLOW_TURN at most (and the main thread's wakeup), once per spell.

A thread runnable but not running (preempted on a busy machine) does not begin
a spell: it is not blocked, and another thread would only wait for the CPU too."""

from __future__ import annotations

import threading
import time

SLOW_SPELL = 1.0  # after a request was seen blocking, every thread polls this long
SLOW_CPU = 0.05   # a request computing this long lets the other threads serve beside it


class Baton:
    def __init__(self) -> None:
        self.holder = None     # the turn (ThreadWorker.run_thread) that alone waits in epoll
        self.slow_until = 0.0  # until then every thread waits in epoll
        self.ended = False
        self.changed = threading.Condition(threading.Lock())

    def take(self, turn) -> None:
        """Before a thread waits in epoll: return at once if it holds the baton or
        a spell is on; else wait until it can hold it, a spell begins, or the end."""
        if self.holder is turn or self.slow_until > time.monotonic():
            return
        with self.changed:
            while not self.ended and self.slow_until <= time.monotonic():
                if self.holder is None:
                    self.holder = turn
                    return
                self.changed.wait()

    def check(self, thread_id: int, serving: float, now: float) -> None:
        """The main thread saw a thread serving one request for `serving` seconds:
        a spell begins if it is blocked (or long computing)."""
        if self.slow_until > now or (serving < SLOW_CPU and runnable(thread_id)):
            return
        self.slow_until = now + SLOW_SPELL
        with self.changed:
            self.holder = None  # it may be the holder: someone else takes the baton after the spell
            self.changed.notify_all()

    def end(self) -> None:
        """The worker stops: waiting threads return, to see threads_done and end."""
        with self.changed:
            self.ended = True
            self.changed.notify_all()


def runnable(thread_id: int) -> bool:
    """Whether a thread of this process is running or waiting for a CPU (Linux
    /proc; elsewhere: unknown, taken as blocked)."""
    try:
        with open(f"/proc/self/task/{thread_id}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split(None, 1)[0] == b"R"
    except (OSError, IndexError):
        return False
