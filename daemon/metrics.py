"""Request metrics that outlive workers, generations and daemon re-execs.

A worker counts each request once (WorkerCounts.observe: one dict update) and
sends what it counted since its last heartbeat as X_APPD_METRICS (deltas);
the master forwards the deltas to the daemon; the daemon adds them up in
MetricsState, which the re-exec state carries. So the totals only ever grow,
whatever is replaced underneath. The Collector turns that state (and the
daemon's live status) into Prometheus families: prometheus_client writes the
exposition, not us.
"""

from __future__ import annotations

import json
import threading
from bisect import bisect_left

from .probation import FAILURE_PREFIX, MAX_FAILURE_KEYS, MAX_PATH

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "WEBSOCKET"}
WORKER_STATES = ("booting", "idle", "busy", "paused", "stopping")
# Connections a worker took from the handoff channel travel in the same deltas, under
# this pseudo-method (never a client's: an unknown method is counted as OTHER).
HANDOFF = "HANDOFF"


def _empty() -> list:
    # count, bytes, duration sum, then one (non-cumulative) count per bucket and +Inf
    return [0, 0, 0.0] + [0] * (len(BUCKETS) + 1)


class WorkerCounts:
    """The worker's side: counts since the last report. Kept by tuple on the request
    path (no string building there: a few dict and list updates per request); turned
    into the report's `listener|method|status class` keys only when taken."""

    def __init__(self):
        self.requests: dict[tuple, list] = {}  # (listener, method, status class) -> _empty()
        self.failures: dict[tuple, int] = {}   # (status, path) -> 5xx answers (probation)
        self.handoffs: dict[str, int] = {}     # listener -> connections taken from the handoff channel
        self.lock = threading.Lock()  # gthread: threads count while the main thread takes

    def observe_environ(self, environ: dict, status: str, sent: int, duration: float) -> None:
        listener = f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"
        self.observe(listener, environ.get("REQUEST_METHOD", "-"), status, sent, duration)

    def observe(self, listener: str, method: str, status: str, sent: int, duration: float) -> None:
        # Methods are client input: anything unknown is OTHER, so the label set stays bounded.
        key = (listener, method if method in _METHODS else "OTHER", status[:1] if status else "0")
        with self.lock:
            entry = self.requests.get(key)
            if entry is None:
                entry = self.requests[key] = _empty()
            entry[0] += 1
            entry[1] += sent
            entry[2] += duration
            entry[3 + bisect_left(BUCKETS, duration)] += 1

    def failed(self, path: str, status: str) -> None:
        """One 5xx answer of `path` (probation's evidence). Bounded: a client choosing
        paths cannot grow the report past MAX_FAILURE_KEYS distinct paths."""
        path = (path or "/").replace("|", "%7C")[:MAX_PATH]
        with self.lock:
            if (status, path) not in self.failures and len(self.failures) >= MAX_FAILURE_KEYS:
                path = "(other)"
            self.failures[(status, path)] = self.failures.get((status, path), 0) + 1

    def handed_off(self, listener: str) -> None:
        """One connection taken from the handoff channel (not a request: no duration)."""
        with self.lock:
            self.handoffs[listener] = self.handoffs.get(listener, 0) + 1

    def take(self) -> str | None:
        """The deltas as JSON (for the heartbeat datagram), then start afresh; None if nothing."""
        if not (self.requests or self.failures or self.handoffs):
            return None
        with self.lock:
            requests, failures, handoffs = self.requests, self.failures, self.handoffs
            self.requests, self.failures, self.handoffs = {}, {}, {}
        report = {f"{listener}|{method}|{cls}xx": entry for (listener, method, cls), entry in requests.items()}
        for listener, count in handoffs.items():
            report[f"{listener}|{HANDOFF}|-"] = [count] + _empty()[1:]
        for (status, path), count in failures.items():
            report[f"{FAILURE_PREFIX}|{status}|{path}"] = [count] + _empty()[1:]
        return json.dumps(report, separators=(",", ":"))


def merge(totals: dict, deltas: dict) -> dict:
    """Add request deltas into `totals` (a master merging its workers', the daemon its masters')."""
    for key, delta in deltas.items():
        if not isinstance(key, str) or key.count("|") != 2 or not isinstance(delta, list) \
                or len(delta) != len(BUCKETS) + 4:
            continue  # a malformed report must not corrupt the totals
        total = totals.setdefault(key, _empty())
        for index, value in enumerate(delta):
            total[index] += value
    return totals


def exit_cause(stop_cause: str | None, forced: bool, clean: bool) -> str:
    """Why a worker exited: the master asked (its cause), it hung (timeout), it left by
    itself cleanly (max_requests), or not (crash)."""
    if stop_cause is not None and not forced:
        return stop_cause
    if forced:
        return "timeout"
    return "max_requests" if clean else "crash"


def parse_deltas(text: str) -> dict:
    try:
        deltas = json.loads(text)
    except ValueError:
        return {}
    return deltas if isinstance(deltas, dict) else {}


class MetricsState:
    """The daemon's totals. Plain dicts so the re-exec state (msgpack) carries them."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.requests: dict[str, list] = state.get("requests", {})
        self.worker_exits: dict[str, int] = state.get("worker_exits", {})
        self.generations: dict[str, int] = state.get("generations", {})
        self.operations: dict[str, list] = state.get("operations", {})

    def to_state(self) -> dict:
        return {"requests": self.requests, "worker_exits": self.worker_exits,
                "generations": self.generations, "operations": self.operations}

    def add_requests(self, deltas: dict) -> None:
        merge(self.requests, deltas)

    def count(self, table: str, key: str) -> None:
        counts = getattr(self, table)
        counts[key] = counts.get(key, 0) + 1

    def operation_done(self, kind: str, outcome: str, duration: float) -> None:
        entry = self.operations.setdefault(f"{kind}|{outcome}", _empty())
        entry[0] += 1
        entry[2] += duration
        entry[3 + bisect_left(BUCKETS, duration)] += 1


def _histogram_buckets(entry: list) -> list:
    buckets, running = [], 0
    for bound, count in zip(list(BUCKETS) + [float("inf")], entry[3:]):
        running += count
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), running))
    return buckets


class Collector:
    """A prometheus_client custom collector over the daemon's own state, read at scrape time.
    (prometheus_client is imported by the daemon only: masters and workers never need it.)"""

    def __init__(self, daemon):
        self.daemon = daemon

    def collect(self):
        yield from self.request_families(self.daemon.metrics)
        yield from self.event_families(self.daemon.metrics)
        yield from self.live_families(self.daemon.status())

    @staticmethod
    def request_families(metrics: MetricsState):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        requests = CounterMetricFamily("appd_requests", "HTTP requests served",
                                       labels=["listener", "method", "status"])
        sent = CounterMetricFamily("appd_response_bytes", "response bytes sent", labels=["listener"])
        duration = HistogramMetricFamily("appd_request_duration_seconds", "request duration",
                                         labels=["listener"])
        handed = CounterMetricFamily("appd_handed_off_connections", "idle kept-alive connections a "
                                     "stopping worker handed on and a serving worker took", labels=["listener"])
        per_listener: dict[str, list] = {}
        for key, entry in sorted(metrics.requests.items()):
            listener, method, status = key.split("|")
            if method == HANDOFF:
                handed.add_metric([listener], entry[0])
                continue
            requests.add_metric([listener, method, status], entry[0])
            merged = per_listener.setdefault(listener, _empty())
            for index, value in enumerate(entry):
                merged[index] += value
        for listener, entry in per_listener.items():
            sent.add_metric([listener], entry[1])
            duration.add_metric([listener], _histogram_buckets(entry), entry[2])
        yield from (requests, sent, duration, handed)

    @staticmethod
    def event_families(metrics: MetricsState):
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
        exits = CounterMetricFamily("appd_worker_exits", "worker exits by cause", labels=["cause"])
        for cause, count in sorted(metrics.worker_exits.items()):
            exits.add_metric([cause], count)
        generations = CounterMetricFamily("appd_generations", "generations by event", labels=["event"])
        for event, count in sorted(metrics.generations.items()):
            generations.add_metric([event], count)
        operations = CounterMetricFamily("appd_operations", "operations by kind and outcome",
                                         labels=["kind", "outcome"])
        duration = HistogramMetricFamily("appd_operation_duration_seconds", "operation duration",
                                         labels=["kind", "outcome"])
        for key, entry in sorted(metrics.operations.items()):
            kind, outcome = key.split("|")
            operations.add_metric([kind, outcome], entry[0])
            duration.add_metric([kind, outcome], _histogram_buckets(entry), entry[2])
        yield from (exits, generations, operations, duration)

    @staticmethod
    def live_families(status: dict):
        from prometheus_client.core import GaugeMetricFamily
        workers = GaugeMetricFamily("appd_workers", "workers by state and generation",
                                    labels=["state", "generation"])
        rss = GaugeMetricFamily("appd_process_resident_memory_bytes", "RSS", labels=["role", "pid"])
        cpu = GaugeMetricFamily("appd_process_cpu_percent", "CPU use", labels=["role", "pid"])
        daemon = status["daemon"]
        rss.add_metric(["daemon", str(daemon["pid"])], daemon.get("rss_bytes") or 0)
        cpu.add_metric(["daemon", str(daemon["pid"])], daemon.get("cpu_percent") or 0.0)
        for generation in status["generations"]:
            counts = dict.fromkeys(WORKER_STATES, 0)
            for worker in generation["workers"]:
                counts[worker_state(worker)] += 1
                rss.add_metric(["worker", str(worker["pid"])], worker.get("rss_bytes") or 0)
                cpu.add_metric(["worker", str(worker["pid"])], worker.get("cpu_percent") or 0.0)
            for state, count in counts.items():
                workers.add_metric([state, str(generation["id"])], count)
        queued = GaugeMetricFamily("appd_listen_queued", "connections waiting in the listen backlog",
                                   labels=["listener"])
        max_queued = GaugeMetricFamily("appd_listen_max_queued", "listen backlog size", labels=["listener"])
        for listener in status["listeners"]:
            if listener.get("queued") is not None:
                queued.add_metric([listener["address"]], listener["queued"])
                max_queued.add_metric([listener["address"]], listener.get("max_queued") or 0)
        last = status.get("last_operation") or {}
        last_ok = GaugeMetricFamily("appd_last_operation_ok", "1 if the last operation succeeded",
                                    labels=["kind", "outcome"])
        if last:
            last_ok.add_metric([str(last.get("op")), str(last.get("outcome"))],
                               1 if last.get("ok") else 0)
        yield from (workers, rss, cpu, queued, max_queued, last_ok)


def worker_state(worker: dict) -> str:
    """The gauge's state: status' own where it is one of ours, else busy or idle.
    A paused worker (a generation standing by in probation) finishing a request is paused."""
    if worker["state"] in ("stopping", "booting", "paused"):
        return worker["state"]
    return "busy" if worker.get("busy") else "idle"
