"""What a master tells its daemon about its workers: the table (phase, target,
how many take requests, each worker) when something changed or once a second,
and the request counts and exit causes since the last report, as deltas."""

from __future__ import annotations

import time

from . import metrics
from .messages import KIND, ToDaemon
from .recycle import REPLACED_CAUSES

EVERY = 1.0  # seconds: the longest the daemon's table (status, top) is left unrefreshed


class DaemonReport:
    def __init__(self, master):
        self.master = master
        self.dirty = True           # something changed since the last report
        self.last_sent = 0.0
        self.metrics: dict = {}     # counts of exited workers, not yet sent to the daemon
        self.exits: list[str] = []  # why ready workers exited (the worker exits metric)

    def worker_exited(self, handle, clean: bool) -> None:
        metrics.merge(self.metrics, handle.unreported)
        if handle.ready:
            cause = metrics.exit_cause(handle.stop_cause, handle.killed(), clean)
            self.exits.append(cause)
            if cause in REPLACED_CAUSES:  # status' list of why workers were replaced
                self.master.recycler.record(handle.pid, cause)
        self.dirty = True

    def send(self, force: bool = False) -> None:
        now = time.monotonic()
        if not (force or self.dirty or now - self.last_sent >= EVERY):
            return
        self.dirty = False
        self.last_sent = now
        self.send_metrics()
        master = self.master
        handles = master.workers.values()
        master.channel.send({KIND: ToDaemon.WORKERS, "phase": master.phase.value, "target": master.target,
                             "ready": sum(1 for h in handles if h.taking_requests()),
                             "replaced": list(master.recycler.replaced),
                             "workers": [h.describe() for h in handles]})

    def send_metrics(self) -> None:
        """Pass the request counts workers reported since last time on to the daemon (deltas)."""
        requests, self.metrics = self.metrics, {}
        for handle in self.master.workers.values():
            metrics.merge(requests, handle.unreported)
            handle.unreported = {}
        exits, self.exits = self.exits, []
        if requests or exits:
            self.master.channel.send({KIND: ToDaemon.METRICS, "requests": requests, "exits": exits})
