"""Markers the bench apps leave in $BENCH_MARK_DIR so the benchmark can see,
without asking either server, when a worker process has finished importing
the app ("ready-PID") and when it is busy in a slow request ("busy-PID")."""

import os

_DIR = os.environ.get("BENCH_MARK_DIR")


def mark(kind: str) -> None:
    if _DIR:
        path = os.path.join(_DIR, f"{kind}-{os.getpid()}")
        with open(path, "w"):
            pass
