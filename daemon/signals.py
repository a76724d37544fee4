"""Signals map onto the same operations the control commands start: HUP
reload, USR2 upgrade, TTIN/TTOU scale +-1, TERM drain (a second TERM cuts a
drain_delay short), INT/QUIT stop, USR1 reopen logs. The handler only
recorded the signal; this runs in the daemon's loop."""

from __future__ import annotations

import signal

from appdctl import protocol

from .canary import upgrade_operation
from .control import LogResponder
from .operations import Scale, Shutdown, Stop
from .reload import Reload

CAUGHT = [signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU, signal.SIGTERM,
          signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGCHLD]


def handle(daemon, signum: int) -> None:
    if signum == signal.SIGCHLD:
        daemon.reap()
        return
    name = signal.Signals(signum).name
    responder = LogResponder(daemon.log, source=name)
    if signum == signal.SIGHUP:
        daemon.begin(Reload(daemon, responder))
    elif signum == signal.SIGUSR2:
        daemon.begin(upgrade_operation(daemon, responder, {}))
    elif signum in (signal.SIGTTIN, signal.SIGTTOU):
        daemon.begin(Scale(daemon, responder, {"delta": 1 if signum == signal.SIGTTIN else -1}))
    elif signum == signal.SIGTERM and isinstance(daemon.operation, Shutdown) and daemon.operation.delaying:
        daemon.operation.cut_delay_short("a second SIGTERM")
    elif signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT):
        shutdown = (Shutdown if signum == signal.SIGTERM else Stop)(daemon, responder, {})
        if daemon.operation is not None and not isinstance(daemon.operation, Shutdown):
            daemon.operation.fail(protocol.FAILED, f"interrupted by {name}")
        daemon.begin(shutdown)
    elif signum == signal.SIGUSR1:
        daemon.reopen_logs()
