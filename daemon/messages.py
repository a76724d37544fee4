"""The daemon <-> master channel (APPD_CHANNEL_FD), declared once for both ends.

Every message is a msgpack map whose "t" names its kind; the other keys are
the kind's fields, listed beside it. The master also speaks to its own
workers over their notify sockets in `KEY=VALUE` datagrams; `SERVE` is the
one that crosses the daemon's cutover (a gated worker starts accepting), and
`PAUSE` stands a generation by and resumes it (probation, canary.py).
"""

from __future__ import annotations

from enum import StrEnum

KIND = "t"


class ToMaster(StrEnum):
    """What the daemon asks of a generation."""

    CONFIG = "config"            # settings, target: first message, before anything else
    SCALE = "scale"              # target
    RELOAD = "reload"            # settings: replace the workers with these settings
    RETIRE = "retire"            # pid: replace one worker
    DRAIN = "drain"              # sweep, timeout, handoff: finish in-flight work and exit
    STOP = "stop"                # quick stop
    PAUSE = "pause"              # handoff: stand by (probation): stop accepting, keep the workers
    RESUME = "resume"            # accept again after PAUSE: no worker boots
    REOPEN_LOGS = "reopen_logs"


class ToDaemon(StrEnum):
    """What a generation tells its daemon."""

    WORKER_READY = "worker_ready"  # pid, ready, target
    READY = "ready"                # every worker is ready (and told to serve)
    BOOT_FAILED = "boot_failed"    # reason, output
    RELOADED = "reloaded"          # ok, reason, output
    RETIRED = "retired"            # ok, pid, reason
    WORKERS = "workers"            # phase, target, ready, workers, replaced: the worker table
    METRICS = "metrics"            # requests, exits: counts since the last report


def message(kind: ToMaster | ToDaemon, **fields) -> dict:
    return {KIND: str(kind), **fields}


def kind_of(msg) -> str | None:
    return msg.get(KIND) if isinstance(msg, dict) else None


# Master -> worker notify datagram at cutover: the gated workers start accepting.
SERVE = "SERVE=1"

# Master -> worker notify datagrams of PAUSE / RESUME: stop accepting (and, with
# "handoff", hand idle keep-alive connections to the serving generation) / accept again.
PAUSE_KEY = "PAUSE"
PAUSED, PAUSED_HANDING_OFF, RESUMED = "1", "handoff", "0"
# Worker -> master: the worker now stands by (1) or accepts again (0).
PAUSED_REPORT = "X_APPD_PAUSED"
