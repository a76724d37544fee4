"""appdctl top: a live view over the status command, refreshed every
--interval seconds, in place on a terminal (like top), as plain blocks of
lines otherwise; --count N stops after N views (for scripts and tests).
Requests/s per worker come from the difference between two status replies."""

from __future__ import annotations

import sys
import time

from .client import Client


def run(socket_path: str | None, interval: float, count: int | None, timeout: float) -> int:
    live = sys.stdout.isatty()
    previous: dict[int, tuple[float, int]] = {}
    shown = 0
    with Client(socket_path, timeout=timeout) as client:
        while count is None or shown < count:
            if shown:
                time.sleep(interval)
            status = client.call("status")
            text = render(status, previous, time.monotonic())
            if live:
                sys.stdout.write("\x1b[H\x1b[2J" + text + "\n")  # home, clear: redraw in place
            else:
                sys.stdout.write(text + "\n\n")
            sys.stdout.flush()
            shown += 1
    return 0


def render(status: dict, previous: dict, now: float) -> str:
    daemon = status["daemon"]
    lines = [f"appd {daemon['version']}  pid {daemon['pid']}  {daemon.get('state', '')}  "
             f"rss {daemon.get('rss_bytes', 0) / 1048576:.1f}M  cpu {daemon.get('cpu_percent') or 0:.0f}%  "
             f"operation: {progress(status)}"]
    for listener in status["listeners"]:
        backlog = f"  backlog {listener['queued']}/{listener['max_queued']}" if listener.get("queued") is not None \
            else ""
        lines.append(f"listener {listener['address']}{backlog}")
    rows = [("GEN", "WORKER", "STATE", "REQ/S", "REQS", "BUSY", "AGE_S", "RSS", "CPU")]
    for gen in status["generations"]:
        for worker in gen["workers"]:
            rows.append((str(gen["id"]), str(worker["pid"]), worker["state"], _rate(worker, previous, now),
                         str(worker["requests"]), "-" if worker.get("busy") is None else str(worker["busy"]),
                         f"{worker.get('request_age_s') or 0:.1f}" if worker.get("busy") else "-",
                         f"{worker['rss_bytes'] / 1048576:.1f}M", f"{worker['cpu_percent']:.0f}%"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)


def progress(status: dict) -> str:
    """The running operation and how far it got, read off the generations: each
    one's state and ready workers against the target."""
    if not status.get("operation"):
        return "-"
    target = status.get("target_workers")
    steps = [f"gen {g['id']} {g['state']} {g.get('ready_workers', 0)}/{target} ready"
             for g in status["generations"]]
    return f"{status['operation']} ({', '.join(steps)})" if steps else status["operation"]


def _rate(worker: dict, previous: dict, now: float) -> str:
    """Requests/s since the last view ("-" on the first)."""
    before = previous.get(worker["pid"])
    previous[worker["pid"]] = (now, worker["requests"])
    if before is None or now <= before[0]:
        return "-"
    return f"{max(0, worker['requests'] - before[1]) / (now - before[0]):.1f}"
