"""Worker recycling by policy: max_worker_memory (RSS, sampled) and
max_worker_lifetime (age, with jitter). The master marks a chosen worker
outgoing, which is how `retire` works: its successor is started first and it
is told to stop only once enough workers are ready, so no request is cut."""

from __future__ import annotations

import random
import time
from collections import deque

import psutil

CHECK_EVERY = 1.0   # seconds between RSS samples: psutil reads /proc, cheap but not free
REMEMBERED = 10     # replacements kept for status
# Exit causes that mean a worker was replaced (status lists them with memory/lifetime):
# not scale (no successor), not a whole generation or reload (every worker goes).
REPLACED_CAUSES = ("retire", "timeout", "crash", "max_requests")


class Recycler:
    def __init__(self, cfg: dict):
        self.memory = cfg.max_worker_memory or 0
        self.lifetime = cfg.max_worker_lifetime or 0.0
        self.lifetimes: dict[int, float] = {}  # pid -> this worker's lifetime, jitter included
        self.next_check = 0.0
        self.replaced: deque = deque(maxlen=REMEMBERED)

    @property
    def active(self) -> bool:
        return bool(self.memory or self.lifetime)

    def choose(self, handles, now: float) -> tuple | None:
        """The one worker to replace now and why, or None. One at a time, so that
        the service never runs short of (or doubles) its workers at once."""
        if not self.active or now < self.next_check:
            return None
        self.next_check = now + CHECK_EVERY
        handles = list(handles)
        if not all(h.serving() for h in handles):
            return None  # a replacement is already under way
        for handle in sorted(handles, key=lambda h: h.spawned_at):
            reason = self.reason(handle, now)
            if reason:
                return handle, reason
        return None

    def reason(self, handle, now: float) -> str | None:
        if self.lifetime:
            lifetime = self.lifetimes.setdefault(handle.pid, self.lifetime * (1 + random.uniform(0, 0.1)))
            if now - handle.spawned_at >= lifetime:
                return f"max_worker_lifetime ({now - handle.spawned_at:.0f} s)"
        if self.memory:
            try:
                rss = psutil.Process(handle.pid).memory_info().rss
            except psutil.Error:
                return None
            if rss > self.memory:
                return f"max_worker_memory (rss {rss} > {self.memory} bytes)"
        return None

    @staticmethod
    def cause(reason: str) -> str:
        """The worker exits metric's cause for a reason given by reason()."""
        return "memory" if reason.startswith("max_worker_memory") else "lifetime"

    def record(self, pid: int, reason: str) -> None:
        self.lifetimes.pop(pid, None)
        self.replaced.append({"pid": pid, "reason": reason, "at": round(time.time(), 3)})
