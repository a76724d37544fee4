"""Probation: what a new generation did on real traffic, and whether that is
bad enough to go back.

Workers report failing requests compactly per heartbeat: a 5xx answer adds one
to the key `!fail|STATUS|PATH` of the same request-count deltas the metrics
report carries (metrics.WorkerCounts), so failures ride the existing
worker -> master -> daemon path (and its merging) unchanged. A worker keeps at
most MAX_FAILURE_KEYS distinct failing paths per report; the rest are counted
under "(other)". The daemon splits them off before the metrics totals
(split_failures) and adds them, with the request counts and worker exits, to
the generation's Outcomes. `verdict` is a pure function of Outcomes and Limits.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

FAILURE_PREFIX = "!fail"
MAX_FAILURE_KEYS = 16     # distinct failing paths per worker report
MAX_PATH = 120            # characters of a failing path kept
TOP = 5                   # failing paths / statuses in the evidence
CRASH_LIMIT = 2           # worker crashes or hangs within probation that make a crash loop
_KEPT_PATHS = 200         # distinct paths the daemon keeps per generation


def note_failure(counts, path: str, status: str) -> None:
    """Worker side: count one 5xx answer of `path` into the pending report of `counts`
    (a metrics.WorkerCounts, which bounds the distinct paths)."""
    counts.failed(path, status)


def split_failures(deltas: dict) -> tuple[dict, dict]:
    """(request deltas for the metrics totals, {(status, path): count})."""
    requests, failures = {}, {}
    for key, delta in deltas.items():
        if isinstance(key, str) and key.startswith(FAILURE_PREFIX + "|"):
            _, status, path = key.split("|", 2)
            count = delta[0] if isinstance(delta, list) and delta and isinstance(delta[0], int) else 0
            failures[(status, path)] = failures.get((status, path), 0) + count
        else:
            requests[key] = delta
    return requests, failures


class Outcomes:
    """One generation's request outcomes, as its workers reported them."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.requests = state.get("requests", 0)
        self.errors = state.get("errors", 0)
        self.crashes = state.get("crashes", 0)
        self.timeouts = state.get("timeouts", 0)
        self.statuses = Counter(state.get("statuses", {}))
        self.paths = Counter(state.get("paths", {}))

    def to_state(self) -> dict:
        return {"requests": self.requests, "errors": self.errors, "crashes": self.crashes,
                "timeouts": self.timeouts, "statuses": dict(self.statuses), "paths": dict(self.paths)}

    def record(self, requests: dict, failures: dict, exits) -> None:
        """Add one master report: request deltas (listener|method|class), failures, exit causes."""
        for key, delta in requests.items():
            if not isinstance(key, str) or not isinstance(delta, list) or not delta:
                continue
            self.requests += delta[0]
            if key.endswith("|5xx"):
                self.errors += delta[0]
        for (status, path), count in failures.items():
            self.statuses[status] += count
            if path in self.paths or len(self.paths) < _KEPT_PATHS:
                self.paths[path] += count
            else:
                self.paths["(other)"] += count
        for cause in exits or ():
            if cause == "crash":
                self.crashes += 1
            elif cause == "timeout":
                self.timeouts += 1

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def counts(self) -> dict:
        """The live counts (progress events, status)."""
        return {"requests": self.requests, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "crashes": self.crashes, "timeouts": self.timeouts}

    def status(self, workers: list) -> dict:
        """For `status`: the counts; where this generation's workers do not report outcomes
        (no metrics, probation or canary when it started), the requests their heartbeats
        counted and errors unknown (None)."""
        if self.requests or self.crashes or self.timeouts:
            return self.counts()
        return {"requests": sum(w.get("requests") or 0 for w in workers), "errors": None, "error_rate": None,
                "crashes": self.crashes, "timeouts": self.timeouts}

    def evidence(self) -> dict:
        """What was observed: counts, the 5xx ratio, the most frequent failing paths and statuses."""
        return {**self.counts(),
                "failing_paths": [[path, n] for path, n in self.paths.most_common(TOP)],
                "failing_statuses": [[status, n] for status, n in self.statuses.most_common(TOP)]}


@dataclass(frozen=True)
class Limits:
    error_rate: float
    min_requests: int
    crash_limit: int = CRASH_LIMIT

    @classmethod
    def of(cls, cfg) -> "Limits":
        return cls(cfg.rollback_error_rate, cfg.rollback_min_requests)


def verdict(outcomes: Outcomes, limits: Limits) -> str | None:
    """Why the generation must be rolled back, or None while it is within the limits."""
    broken = outcomes.crashes + outcomes.timeouts
    if broken >= limits.crash_limit:
        return (f"{outcomes.crashes} worker crash(es) and {outcomes.timeouts} timeout(s) "
                f"(limit {limits.crash_limit})")
    if outcomes.requests >= max(1, limits.min_requests) and outcomes.error_rate > limits.error_rate:
        return (f"5xx ratio {outcomes.error_rate:.3f} over {outcomes.requests} requests "
                f"exceeds rollback_error_rate {limits.error_rate}")
    return None

