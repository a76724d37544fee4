"""A master's first steps after exec, before it has a loop: take the settings the
daemon sends first on the channel, then set up logging, the working directory,
the process (env, user, group, umask) and the inherited listeners."""

from __future__ import annotations

import os
import signal
import socket
import sys
from dataclasses import dataclass

from appdctl.protocol import FrameDecoder

from . import handoff
from . import listeners as listeners_mod
from . import log, proc, process_setup
from .config import Settings


@dataclass
class Boot:
    """What the daemon gave this master: its environment, then the first channel messages."""
    generation: int
    daemon_pid: int
    channel_sock: socket.socket
    cfg: Settings
    target: int
    listeners: list
    pending: list  # messages that came right after the settings


def prepare() -> Boot:
    generation = int(os.environ["APPD_GENERATION"])
    channel_sock = socket.socket(fileno=int(os.environ["APPD_CHANNEL_FD"]))
    os.set_inheritable(channel_sock.fileno(), False)  # ours alone: no exec'd worker may hold it
    first, pending = read_config_message(channel_sock)
    cfg = Settings(first["settings"])
    log.configure(cfg.log_format, cfg.log_level, cfg.error_log, generation=generation)
    os.chdir(cfg.chdir)
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    process_setup.prepare(cfg)  # raw_env, pythonpath, umask, logging, then user/group
    proc.die_with_parent(signal.SIGTERM)
    listeners = listeners_mod.from_generation_env()
    handoff.close_on_exec()  # the channel is for the forked workers, not for programs they exec
    return Boot(generation, int(os.environ["APPD_DAEMON_PID"]), channel_sock, cfg, first["target"],
                listeners, pending)


def read_config_message(sock: socket.socket, timeout: float = 30.0) -> tuple[dict, list]:
    """Block for the daemon's first message (the config); return it and any that followed."""
    sock.settimeout(timeout)
    decoder = FrameDecoder()
    while True:
        data = sock.recv(65536)
        if not data:
            raise SystemExit("appd master: the daemon closed the channel before sending the config")
        messages = decoder.feed(data)
        if messages:
            return messages[0], messages[1:]
