"""Re-exec of the daemon in place (`appdctl upgrade --daemon`): the daemon
execve()s its own, possibly new, code and keeps its PID, listeners, control
socket, connected clients and running generations.

State crosses the exec as one versioned msgpack map in a memfd whose number
is in APPD_DAEMON_STATE_FD. Before the exec, the new code is probed in a
child interpreter; if it cannot import or cannot read this state version,
nothing happens and the old daemon keeps running.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import msgpack

from appdctl import protocol

from . import __version__
from .metrics import MetricsState
from .probation import Outcomes

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
    stdin) as far as restore() needs, without touching a descriptor.
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
    for part, keys in _ENTRY_KEYS.items():  # what restore() reads of each entry
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


def snapshot(daemon, client=None, request_id=None) -> dict:
    """Everything the next image needs, with fds by number."""
    return {
        "version": STATE_VERSION,
        "argv": sys.argv,
        "flags": daemon.flags,
        "config": {"values": daemon.cfg.values, "sources": daemon.cfg.sources},
        "environ": daemon.environ,
        "target": daemon.target,
        "started_wall": time.time() - (time.monotonic() - daemon.started),
        "next_generation": daemon.next_generation,
        "last_operation": daemon.last_operation,
        "operation_age": time.monotonic() - daemon.operation.started if daemon.operation else 0.0,
        "crashes": daemon.crashes,
        "state": daemon.state,
        "metrics": daemon.metrics.to_state(),
        "listeners": [{"fd": l.fd, "name": l.name, "spec": l.spec, "owned": l.owned} for l in daemon.listeners],
        "generation_env": daemon.generation_env,
        "control": {"fd": daemon.control.sock.fileno(), "path": daemon.control.path},
        "handoff": daemon.handoff.fds(),
        "clients": [{"fd": c.channel.sock.fileno(), "buffer": bytes(c.channel.decoder.buffer),
                     "reply_to": request_id if c is client else None}
                    for c in daemon.control.clients if not c.channel.closed],
        "generations": [{
            "id": g.id, "pid": g.pid, "state": g.state, "started_at": g.started_at,
            "age": time.monotonic() - g.started_mono,
            "ready_age": None if g.ready_at is None else time.monotonic() - g.ready_at,
            "channel_fd": g.channel.sock.fileno() if g.channel and not g.channel.closed else -1,
            "output_fd": g.output_fd, "snapshot": g.snapshot, "tail": list(g.tail), "env": g.extra_env,
            "outcomes": g.outcomes.to_state(),
        } for g in daemon.generations if g.alive],
    }


def fds_of(state: dict) -> list[int]:
    fds = [l["fd"] for l in state["listeners"]] + [state["control"]["fd"]] + state.get("handoff", [])
    fds += [c["fd"] for c in state["clients"]]
    for g in state["generations"]:
        fds += [fd for fd in (g["channel_fd"], g["output_fd"]) if fd >= 0]
    return fds


def execute(daemon, client, request_id) -> str:
    """Flush, hand over and exec. Returns only on failure, with the reason."""
    for c in list(daemon.control.clients):
        c.channel.flush_pending(timeout=1.0)
    for g in daemon.generations:
        if g.channel and not g.channel.closed:
            g.channel.flush_pending(timeout=1.0)
    state = snapshot(daemon, client, request_id)
    memfd = os.memfd_create("appd-state", 0)
    os.write(memfd, msgpack.packb(state, use_bin_type=True))
    os.lseek(memfd, 0, os.SEEK_SET)
    fds = fds_of(state) + [memfd]
    for fd in fds:
        os.set_inheritable(fd, True)
    env = {**os.environ, STATE_FD_ENV: str(memfd)}
    argv = [sys.executable, "-m", "appd", *sys.argv[1:]]
    try:
        os.execve(sys.executable, argv, env)
    except OSError as exc:
        for fd in fds[:-1]:
            if fd not in [l.fd for l in daemon.listeners] + daemon.handoff.fds():
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


def restore(daemon, state: dict) -> None:
    """Rebuild the daemon around the descriptors the previous image left open."""
    from .control import ControlClient, ControlServer
    from .handoff import Channel
    from .generation import Generation
    from .listeners import Listener

    daemon.target = state["target"]
    daemon.started = time.monotonic() - (time.time() - state["started_wall"])
    daemon.next_generation = state["next_generation"]
    daemon.last_operation = {"op": "upgrade-daemon", "ok": True, "outcome": "done", "error": None,
                             "duration_s": round(state["operation_age"], 3)}
    daemon.crashes = state["crashes"]
    daemon.metrics = MetricsState(state.get("metrics"))
    daemon.state = state["state"]
    daemon.generation_env = state.get("generation_env", {})
    daemon.listeners = [Listener(l["name"], adopt_socket(l["fd"]), l["spec"], l.get("owned", l["spec"].startswith("unix:")))
                        for l in state["listeners"]]
    daemon.control = ControlServer(daemon, daemon.cfg, adopt_fd=state["control"]["fd"])
    if state.get("handoff"):  # absent when the previous image predates connection handoff
        daemon.handoff = Channel.adopt(state["handoff"])
    now = time.monotonic()
    for g in state["generations"]:
        generation = Generation(g["id"], daemon.pid)
        generation.pid, generation.state, generation.started_at = g["pid"], g["state"], g["started_at"]
        generation.started_mono = now - g["age"]
        generation.ready_at = None if g["ready_age"] is None else now - g["ready_age"]
        generation.snapshot = g["snapshot"]
        generation.extra_env = g.get("env", {})
        generation.outcomes = Outcomes(g.get("outcomes"))
        generation.tail.extend(g["tail"])
        generation.adopt(daemon.loop, g["channel_fd"], g["output_fd"], daemon.on_generation_message)
        daemon.generations.append(generation)
        if generation.state == "draining":
            daemon.loop.call_later(daemon.cfg.graceful_timeout + 5.0, lambda gen=generation: daemon._overstayed(gen))
    for c in state["clients"]:
        client = ControlClient(daemon.control, adopt_socket(c["fd"]))
        daemon.control.clients.add(client)
        if c["reply_to"] is not None:
            client.send(protocol.ok_reply(c["reply_to"], {"outcome": "done", "pid": daemon.pid,
                                                          "version": __version__}))
        if c["buffer"]:
            for message in client.channel.decoder.feed(c["buffer"]):
                client.on_message(client.channel, message)


def adopt_socket(fd: int) -> socket.socket:
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock
