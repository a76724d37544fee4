"""One small unit per control command; each module's docstring is its
documentation (`appdctl help` prints it). A unit has run(daemon, args, responder)."""

from __future__ import annotations

import importlib

from appdctl.protocol import COMMANDS


def unit(cmd: str):
    return importlib.import_module(f"{__name__}.{cmd}")


def dispatch(daemon, cmd: str, args: dict, responder) -> None:
    assert cmd in COMMANDS
    unit(cmd).run(daemon, args, responder)
