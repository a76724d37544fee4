"""Re-exec of the daemon in place (`appdctl upgrade --daemon`): the daemon
execve()s its own, possibly new, code and keeps its PID, listeners, control
socket, connected clients and running generations.

State crosses the exec as one versioned msgpack map in a memfd whose number
is in APPD_DAEMON_STATE_FD. This module only carries it: each part of the
daemon exports and adopts its own piece (Daemon.export_state, from_state). Before the exec, the new code is probed in a
child interpreter; if it cannot import or cannot read this state version,
nothing happens and the old daemon keeps running.
"""

from __future__ import annotations

import os
import sys

import msgpack

STATE_VERSION = 1
STATE_FD_ENV = "APPD_DAEMON_STATE_FD"
_PROBE = "import sys, appd.reexec as r; sys.exit(r.probe(sys.argv[1:]))"
READABLE_VERSIONS = (1,)
_STATE_KEYS = ("version", "flags", "config", "environ", "target", "listeners", "control", "clients",
               "generations")
_ENTRY_KEYS = {"listeners": ("fd", "name", "spec"), "clients": ("fd", "buffer", "reply_to"),
               "generations": ("id", "pid", "state", "started_at", "age", "ready_age", "channel_fd", "output_fd",
                               "snapshot", "tail")}


def probe(argv: list[str]) -> int:
    """In a child of the old daemon, with the new code: dry-run what the new image
    will do, parse the daemon's arguments and read the handed-over state (on
    stdin) as far as Daemon.from_state() needs, without touching a descriptor.
    Exit 0: fine; 2: the arguments do not parse; 3: the state is not readable."""
    from . import cli, daemon  # noqa: F401  (the import itself is part of the test)
    try:
        args = cli.build_parser().parse_args(argv)
    except SystemExit:
        return 2
    if args.subcommand != "start":
        print(f"appd: the daemon was started as `appd {args.subcommand}`", file=sys.stderr)
        return 2
    try:
        state = msgpack.unpackb(sys.stdin.buffer.read(), raw=False, strict_map_key=False)
        check_state(state)
        config_of(state)
    except Exception as exc:
        print(f"appd: cannot restore the daemon state: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 3
    return 0


def check_state(state) -> None:
    if not isinstance(state, dict) or state.get("version") not in READABLE_VERSIONS:
        version = state.get("version") if isinstance(state, dict) else None
        raise ValueError(f"daemon state version {version} is not readable by this code")
    missing = [key for key in _STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"daemon state lacks {', '.join(missing)}")
    for part, keys in _ENTRY_KEYS.items():  # what from_state() reads of each entry
        for entry in state[part]:
            lacking = [key for key in keys if key not in entry]
            if lacking:
                raise ValueError(f"daemon state: a {part} entry lacks {', '.join(lacking)}")


def config_of(state: dict):
    """(Config, flags) the previous image ran with."""
    from .config import Config
    return Config(dict(state["config"]["values"]), dict(state["config"]["sources"])), state["flags"]


def start_probe(state: bytes) -> tuple[int, int]:
    """Start a child that runs probe() with the new code and `state` on its stdin;
    returns (pid, fd of its output)."""
    out_r, out_w = os.pipe()
    in_fd = os.memfd_create("appd-probe-state", 0)
    os.write(in_fd, state)
    os.lseek(in_fd, 0, os.SEEK_SET)
    try:
        pid = os.posix_spawn(sys.executable, [sys.executable, "-c", _PROBE, *sys.argv[1:]],
                             dict(os.environ), file_actions=[(os.POSIX_SPAWN_DUP2, in_fd, 0),
                                                             (os.POSIX_SPAWN_DUP2, out_w, 1),
                                                             (os.POSIX_SPAWN_DUP2, out_w, 2)])
    finally:
        os.close(out_w)
        os.close(in_fd)
    os.set_blocking(out_r, False)
    return pid, out_r


def pack(state: dict) -> bytes:
    return msgpack.packb(state, use_bin_type=True)


def fds_of(state: dict) -> list[int]:
    fds = [l["fd"] for l in state["listeners"]] + [state["control"]["fd"]] + state.get("handoff", [])
    fds += [c["fd"] for c in state["clients"]]
    for g in state["generations"]:
        fds += [fd for fd in (g["channel_fd"], g["output_fd"]) if fd >= 0]
    return fds


def execute(daemon, client, request_id) -> str:
    """Flush, hand over and exec. Returns only on failure, with the reason."""
    daemon.flush_channels()
    state = daemon.export_state(client, request_id)
    memfd = os.memfd_create("appd-state", 0)
    os.write(memfd, pack(state))
    os.lseek(memfd, 0, os.SEEK_SET)
    fds = fds_of(state) + [memfd]
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, STATE_FD_ENV: str(memfd)}
    argv = [sys.executable, "-m", "appd", *sys.argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        shared = set(daemon.shared_fds())
        for fd in fds[:-1]:
            if fd not in shared:
                os.set_inheritable(fd, False)
        os.close(memfd)
        return f"exec of {sys.executable} failed: {exc.strerror or exc}"
    return "unreachable"


def read_state(environ=os.environ) -> dict | None:
    """In the new image: the state left by the previous one, or None on a fresh start."""
    fd = environ.get(STATE_FD_ENV)
    if not fd:
        return None
    os.environ.pop(STATE_FD_ENV, None)
    with os.fdopen(int(fd), "rb") as f:
        state = msgpack.unpackb(f.read(), raw=False, strict_map_key=False)
    check_state(state)
    for fd in fds_of(state):
        os.set_inheritable(fd, False)
    for fd in [l["fd"] for l in state["listeners"]] + state.get("handoff", []):
        os.set_inheritable(fd, True)  # generations inherit them
    return state
