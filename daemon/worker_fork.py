"""Forking one worker. The child leaves the master behind (its signal handlers,
its loop, the daemon channel, the other workers' sockets), becomes an instance
of the worker class and exits with its code: it never returns to the master's
code. The parent keeps its end of the worker's report socket."""

from __future__ import annotations

import os
import signal
import socket
import sys
import traceback

# The signals the master catches; a worker starts from the defaults and sets its own.
MASTER_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGCHLD,
                  signal.SIGUSR1, signal.SIGHUP)


def fork_worker(master, serial: int, gated: bool) -> tuple[int, socket.socket]:
    """Fork worker number `serial`; return its pid and the master's end of its report socket."""
    cls = master.worker_cls
    parent_sock, child_sock = cls.report_sockets(serial)
    pid = os.fork()
    if pid == 0:
        if parent_sock is not child_sock:
            parent_sock.close()
        _become_worker(master, cls, child_sock, serial, gated)  # never returns
    if parent_sock is not child_sock:
        child_sock.close()
    parent_sock.setblocking(False)
    return pid, parent_sock


def _become_worker(master, cls, report_sock: socket.socket, serial: int, gated: bool) -> None:
    code = 1
    try:
        _leave_master(master)
        worker = cls(master_pid=master.pid, generation=master.generation, serial=serial,
                     listeners=master.listeners, cfg=master.cfg, app=master.app,
                     report_sock=report_sock, gated=gated)
        code = worker.run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 0
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _leave_master(master) -> None:
    for signum in MASTER_SIGNALS:
        signal.signal(signum, signal.SIG_DFL)
    master.loop.close()  # closes the master's descriptors in this child only
    master.channel.sock.close()
    for handle in master.workers.values():
        handle.sock.close()
