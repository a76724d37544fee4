"""One small unit per control command; each module's docstring is its
documentation. A unit has run(daemon, args, responder)."""

from __future__ import annotations

import importlib


def unit(cmd: str):
    return importlib.import_module(f"{__name__}.{cmd}")


def dispatch(daemon, cmd: str, args: dict, responder) -> None:
    """Run one command behind the daemon's exception boundary: whatever a unit
    raises is logged and answered `internal`, and the daemon goes on serving."""
    try:
        unit(cmd).run(daemon, args, responder)
    except Exception as exc:
        daemon.internal_error(exc, f"command {cmd}", responder)
