"""structlog set up once per process: every line carries `generation` and `pid`,
rendered for a console or as JSON, written to a file that can be reopened
(logrotate: `appdctl reopen-logs` or SIGUSR1)."""

from __future__ import annotations

import os
import sys
import threading

import structlog

_generation = 0
_files: list["LogFile"] = []


class LogFile:
    """A log destination that can be reopened by path; '-' means stderr."""

    def __init__(self, path: str):
        self.path = path
        # Reentrant: a SIGUSR1 handler may reopen while this thread is inside write().
        self.lock = threading.RLock()
        self.file = sys.stderr if path == "-" else open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        with self.lock:
            try:
                self.file.write(text)
            except (OSError, ValueError):
                pass  # a log line is never worth crashing for

    def flush(self) -> None:
        try:
            self.file.flush()
        except (OSError, ValueError):
            pass

    def reopen(self) -> None:
        if self.path == "-":
            return
        with self.lock:
            old, self.file = self.file, open(self.path, "a", buffering=1)
            old.close()


def _add_process(logger, method, event_dict):
    event_dict.setdefault("generation", _generation)
    event_dict["pid"] = os.getpid()
    return event_dict


def configure(log_format: str = "console", level: str = "info", error_log: str = "-",
              generation: int = 0) -> None:
    global _generation
    _generation = generation
    destination = LogFile(error_log)
    _files.append(destination)
    renderer = (structlog.processors.JSONRenderer() if log_format == "json"
                else structlog.dev.ConsoleRenderer(colors=destination.file.isatty()))
    structlog.configure(
        processors=[
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_process,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(destination),  # one write per line: no interleaving
        cache_logger_on_first_use=False,
    )



def reopen() -> list[str]:
    """Reopen every log file; returns what could not be reopened (those keep writing
    to their old descriptor: a removed log directory must not kill the process)."""
    errors = []
    for destination in _files:
        try:
            destination.reopen()
        except OSError as exc:
            errors.append(f"cannot reopen {destination.path}: {exc.strerror or exc}")
    return errors


def get(**context):
    return structlog.get_logger().bind(**context)


def register(destination: LogFile) -> None:
    """A log file reopened with the others (the access log lives in daemon/access.py)."""
    _files.append(destination)


def generation() -> int:
    return _generation
