"""Crash recovery: whenever no generation serves or starts and the daemon is
not stopping, start one. Repeated crashes back off exponentially (the daemon
then reports itself crashlooping); a generation that served for a while
before dying starts the count afresh."""

from __future__ import annotations

from .generation import GenerationState

CRASH_BACKOFF_MAX = 30.0
STABLE_AFTER = 10.0  # a generation that lived this long was not crashlooping
_KEPT = 10


class CrashRecovery:
    def __init__(self, daemon, crashes: list[dict] | None = None):
        self.daemon = daemon
        self.crashes: list[dict] = list(crashes or [])  # carried across a daemon re-exec
        self.timer = None

    def backoff(self) -> float:
        count = len(self.crashes)
        return 0.0 if count <= 1 else min(CRASH_BACKOFF_MAX, 0.5 * 2 ** (count - 1))

    def crashed(self, generation, how: str, wall_time: float) -> None:
        """A serving generation died, or one that recovery started failed to boot."""
        daemon = self.daemon
        if daemon.serving is not None or daemon.generations.starting:
            return
        lived = daemon.clock() - (generation.ready_at or generation.started_mono)
        if lived > STABLE_AFTER and generation.state == GenerationState.EXITED:
            self.crashes.clear()
        self.crashes.append({"generation": generation.id, "status": how, "at": wall_time,
                             "output": generation.last_lines(5)})
        self.crashes = self.crashes[-_KEPT:]
        if len(self.crashes) > 1:
            daemon.crashlooping()
        daemon.log.error("master_crashed", generation=generation.id, status=how, restart_in=self.backoff(),
                         crashes=len(self.crashes), state=daemon.state)
        self.ensure_serving()

    def ensure_serving(self) -> None:
        """Arm recovery when no generation serves or starts: after a crash, and after
        every operation (one may end with nothing serving, e.g. the new master died
        right after cutover while the old one drained). Running operations, a
        stopping daemon and a recovery already armed wait their turn."""
        if self.timer is None and self._needed():
            self.timer = self.daemon.loop.call_later(self.backoff(), self.recover)

    def recover(self) -> None:
        self.timer = None
        if not self._needed():
            return
        try:
            self.daemon.generations.start()
        except OSError as exc:
            self.daemon.log.error("recovery_failed", error=str(exc))
            self.timer = self.daemon.loop.call_later(CRASH_BACKOFF_MAX, self.recover)

    def cancel(self) -> None:
        self.daemon.loop.cancel(self.timer)
        self.timer = None

    def _needed(self) -> bool:
        daemon = self.daemon
        return (daemon.serving is None and not daemon.generations.starting and daemon.operation is None
                and daemon.accepts_recovery())
