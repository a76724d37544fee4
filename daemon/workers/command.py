"""The command worker: each worker is a program of any language.

It receives the listeners the way systemd's socket activation passes them
(fds from 3 on, LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES), so servers that
support that protocol work unchanged (`gunicorn --bind fd://3`,
`uvicorn --fd 3`). It reports readiness with READY=1 on NOTIFY_SOCKET, or,
if it never does, counts as ready after `ready_delay` seconds
(ready_delay = 0: READY=1 is required). If it sends WATCHDOG=1 it is held to
`timeout` like any worker (WATCHDOG_USEC tells it the interval).
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys

from .. import proc

_APPD_PRIVATE = {"APPD_FDS", "APPD_FD_NAMES", "APPD_CHANNEL_FD", "APPD_DAEMON_PID", "APPD_GENERATION",
                 "APPD_HANDOFF_FD"}


class CommandWorker:
    GRACEFUL_SIGNAL = signal.SIGTERM
    DRAIN_SIGNAL = signal.SIGTERM   # a foreign program knows no backlog sweep
    QUICK_SIGNAL = signal.SIGINT
    HEARTBEAT = False               # only once the program sends WATCHDOG=1

    @staticmethod
    def report_sockets(serial: int) -> tuple[socket.socket, socket.socket]:
        """A datagram socket the master reads, bound to an abstract name the program can send to."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(f"\0appd-notify-{os.getpid()}-{serial}-{os.urandom(4).hex()}")
        return sock, sock

    def __init__(self, *, master_pid: int, generation: int, serial: int, listeners: list,
                 cfg: dict, app, report_sock: socket.socket, gated: bool = False):
        self.master_pid = master_pid  # a foreign program accepts when it likes: never gated
        self.generation = generation
        self.listeners = listeners
        self.cfg = cfg
        self.notify_name = "@" + report_sock.getsockname()[1:].decode()
        report_sock.close()

    def run(self) -> int:
        """Hand the listeners over at fds 3.. and exec the program; returns only on failure."""
        proc.die_with_parent(signal.SIGTERM)
        argv = self.cfg.command
        fds = [fcntl.fcntl(l.fd, fcntl.F_DUPFD_CLOEXEC, 100) for l in self.listeners]
        for listener in self.listeners:  # the program gets each listener once, at 3.., not twice
            os.set_inheritable(listener.fd, False)
        for index, fd in enumerate(fds):
            os.dup2(fd, 3 + index, inheritable=True)
        # Exactly what the socket-activation protocol names: none of appd's own variables,
        # which describe fds the program does not have (APPD_FDS, APPD_CHANNEL_FD...).
        env = {k: v for k, v in os.environ.items() if k not in _APPD_PRIVATE}
        env.update({
            "LISTEN_FDS": str(len(fds)), "LISTEN_PID": str(os.getpid()),
            "LISTEN_FDNAMES": ":".join(l.name for l in self.listeners),
            "NOTIFY_SOCKET": self.notify_name,
            "APPD_WORKER_GENERATION": str(self.generation),
        })
        if self.cfg.timeout:
            env["WATCHDOG_USEC"] = str(int(self.cfg.timeout * 1_000_000))
            env["WATCHDOG_PID"] = str(os.getpid())
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
                       signal.SIGHUP, signal.SIGABRT):
            signal.signal(signum, signal.SIG_DFL)
        try:
            os.execvpe(argv[0], argv, env)
        except OSError as exc:
            print(f"appd: cannot run command worker {argv[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127
