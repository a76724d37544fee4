"""The fake world of the daemon's unit tests (tableflip's `env` idea): generations
that are never spawned, whose masters' messages the test posts, and a clock the
test moves. Nothing here starts a process or sleeps."""

from __future__ import annotations

from appd import config
from appd.daemon import Daemon, DaemonState
from appd.messages import KIND, ToDaemon
from appd.upgrade import Start


class _NoSocket:
    @staticmethod
    def fileno() -> int:
        return -1  # exported state names no descriptor: an adopting test gives a fake channel


class FakeChannel:
    sock = _NoSocket()

    def __init__(self):
        self.sent: list[dict] = []
        self.closed = False

    def send(self, message: dict) -> None:
        self.sent.append(dict(message))

    def close(self, reason: str) -> None:
        self.closed = True


class FakeEnv:
    """Spawns nothing, kills nothing; the test reads what would have happened."""

    def __init__(self):
        self.now = 1000.0
        self.spawned = []
        self.killed: list[tuple[int, int]] = []
        self.spawn_error: str | None = None

    def clock(self) -> float:
        return self.now

    def spawn(self, generation, loop, python, settings, target, environment, on_message) -> None:
        if self.spawn_error:
            raise OSError(self.spawn_error)
        generation.pid = 900000 + generation.id  # never signalled: kill() is ours
        generation.channel = FakeChannel()
        generation.spawned_with = {"target": target, "environment": environment, "settings": settings}
        self.spawned.append(generation)

    def kill(self, generation, signum) -> None:
        self.killed.append((generation.id, signum))

    def reaped_children(self):
        return []

    def kill_stragglers(self, daemon_pid, keep, group, log) -> None:
        pass


class Recorder:
    """A responder that keeps what an operation answered."""

    def __init__(self):
        self.events: list[tuple[str, dict]] = []
        self.result: dict | None = None
        self.error: dict | None = None
        self.replied = False
        self.peer_uid = 0

    def event(self, name: str, **fields) -> None:
        self.events.append((name, fields))

    def done(self, result: dict) -> None:
        self.replied, self.result = True, result

    def fail(self, code: str, message: str, **extra) -> None:
        self.replied, self.error = True, {"code": code, "message": message, **extra}


def make_daemon(flags: dict | None = None) -> Daemon:
    cfg = config.load({"workers": 2, **(flags or {})}, environ={})
    return Daemon(cfg, dict(flags or {}), environ={}, env=FakeEnv())


def post(daemon: Daemon, generation, kind: ToDaemon, **fields) -> None:
    """What generation's master would send."""
    daemon.generations.on_message(generation, {KIND: kind, **fields})


def sent(generation) -> list[dict]:
    """What the daemon sent to `generation`'s master (all but the config)."""
    return generation.channel.sent


def kinds(generation) -> list[str]:
    return [m[KIND] for m in sent(generation)]


def workers(daemon: Daemon, generation, ready: int, count: int | None = None) -> None:
    """A worker table with `ready` ready workers (and `count` in all)."""
    table = [{"pid": 1000 * generation.id + i, "state": "ready" if i < ready else "booting",
              "started_at": 0.0, "requests": 0} for i in range(ready if count is None else count)]
    post(daemon, generation, ToDaemon.WORKERS, phase="serving", target=daemon.target, ready=ready,
         workers=table)


def ready(daemon: Daemon, generation) -> None:
    workers(daemon, generation, daemon.target)
    post(daemon, generation, ToDaemon.READY)


def serving_daemon(flags: dict | None = None) -> tuple[Daemon, object]:
    """A daemon whose first generation serves."""
    daemon = make_daemon(flags)
    daemon.begin(Start(daemon, Recorder()))
    first = daemon.generations[0]
    ready(daemon, first)
    daemon.state = DaemonState.RUNNING
    return daemon, first


def tick(daemon: Daemon, seconds: float = 0.0) -> None:
    daemon.env.now += seconds
    if daemon.operation is not None:
        daemon.drive(daemon.operation, "tick", daemon.clock())
