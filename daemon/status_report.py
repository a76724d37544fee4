"""What `appdctl status` (and /metrics, and systemd's STATUS=) say about the
daemon. The field names are the contract in DESIGN.md."""

from __future__ import annotations

from . import __version__


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 1)


def status(daemon) -> dict:
    report = {
        "daemon": {"pid": daemon.pid, "version": __version__, "state": str(daemon.state),
                   "drain_delay_left_s": _rounded(daemon.drain_delay_left()),
                   "not_ready": daemon.not_ready_reason(),
                   "uptime_s": round(daemon.clock() - daemon.started, 1), "socket": daemon.control.path,
                   **dict(zip(("rss_bytes", "cpu_percent"), daemon.usage(daemon.pid))),
                   "metrics_address": daemon.health.address if daemon.health else None},
        "target_workers": daemon.target,
        "listeners": daemon.listeners.describe(),
        "generations": [g.describe(daemon.usage) for g in daemon.generations if g.alive],
        "last_operation": daemon.last_operation,
        "operation": daemon.operation.name if daemon.operation else None,
        "crashes": daemon.recovery.crashes,
    }
    daemon.usage.keep_only({daemon.pid} | {w["pid"] for g in report["generations"] for w in g["workers"]})
    return report


def status_line(daemon) -> str:
    """systemd's STATUS= line."""
    serving = daemon.serving
    ready = serving.snapshot.get("ready", 0) if serving else 0
    last = daemon.last_operation["outcome"] if daemon.last_operation else "none"
    return (f"STATUS=generation {serving.id if serving else '-'}, {ready}/{daemon.target} workers "
            f"ready, last operation: {last}")
