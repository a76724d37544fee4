"""Rolling a new generation out: Upgrade, Start (the first generation) and the
part of Reload that applies listener changes all start generation N+1, wait
until it is ready, cut over and drain N; if N+1 fails, it is stopped and N
keeps serving untouched. That shared state machine is a Rollout; the
operation that owns it decides what success and rollback mean for it."""

from __future__ import annotations

from enum import StrEnum

from appdctl import protocol

from .messages import KIND, ToDaemon, ToMaster, kind_of
from .operations import Operation


class Phase(StrEnum):
    BOOTING = "booting"              # N+1 starts; N serves
    SHRINKING_OLD = "shrinking_old"  # max_surge: N gives up a step of workers
    GROWING_NEW = "growing_new"      # max_surge: N+1 takes a step more
    DRAINING = "draining"            # cut over: N+1 serves, N finishes its requests
    ROLLING_BACK = "rolling_back"    # N+1 failed: it is stopped, N serves on


class Rollout:
    """Start a new generation and cut over to it once every worker is ready. With
    max_surge the new generation starts with `step` workers and grows as the
    serving one shrinks, so at most target + step workers run at once. Ends by
    calling its owner's rolled_out(generation) or rolled_back(reason, output,
    **where), or fail() when the new generation died after cutover."""

    def __init__(self, owner: Operation, extra_env: dict | None = None):
        self.owner = owner
        self.daemon = owner.daemon
        self.extra_env = extra_env
        self.phase: Phase | None = None

    def start(self) -> None:
        daemon = self.daemon
        self.old = [g for g in daemon.generations if g.alive]
        self.shrinking = daemon.serving
        self.step = min(daemon.cfg.max_surge or daemon.target, daemon.target) if self.shrinking else daemon.target
        self.new_target = self.step
        try:
            self.new = self.spawn_new(self.step)
        except OSError as exc:
            self.owner.rolled_back(str(exc), "")
            return
        self.phase = Phase.BOOTING
        self.deadline = daemon.clock() + daemon.cfg.boot_timeout
        self.owner.progress("spawned", generation=self.new.id, master_pid=self.new.pid, target=daemon.target)

    def spawn_new(self, target: int):
        """The new generation (a watched rollout asks its workers to report outcomes)."""
        return self.daemon.generations.start(extra_env=self.extra_env, target=target)

    def on_message(self, generation, message: dict) -> None:
        if self.phase in (Phase.SHRINKING_OLD, Phase.GROWING_NEW):
            self.on_surge_message(generation, message)
            return
        if generation is not self.new or self.phase != Phase.BOOTING:
            return
        kind = kind_of(message)
        if kind == ToDaemon.WORKER_READY:
            self.owner.progress("booting", generation=self.new.id, ready=message["ready"], target=message["target"])
        elif kind == ToDaemon.READY:
            self.next_step()
        elif kind == ToDaemon.BOOT_FAILED:
            self.roll_back(message.get("reason", "boot failed"), message.get("output", ""))

    def next_step(self) -> None:
        self.cut_over() if self.new_target >= self.daemon.target else self.shrink_old()

    # --- max_surge: step by step, never fewer ready than target, never more than target + step ---

    def on_surge_message(self, generation, message: dict) -> None:
        if kind_of(message) != ToDaemon.WORKERS or generation not in (self.new, self.shrinking):
            return
        if self.phase == Phase.SHRINKING_OLD:
            if len(self.shrinking.snapshot.get("workers", [])) <= self.daemon.target - self.new_target:
                self.grow_new()
        elif self.new.snapshot.get("ready", 0) >= self.new_target:
            self.next_step()

    def shrink_old(self) -> None:
        self.phase = Phase.SHRINKING_OLD
        left = self.daemon.target - self.new_target
        self.owner.progress("surge", generation=self.new.id, new_workers=self.new_target, old_workers=left)
        self.shrinking.send({KIND: ToMaster.SCALE, "target": left})

    def grow_new(self) -> None:
        self.phase = Phase.GROWING_NEW
        self.new_target = min(self.daemon.target, self.new_target + self.step)
        self.deadline = self.daemon.clock() + self.daemon.cfg.boot_timeout
        self.new.send({KIND: ToMaster.SCALE, "target": self.new_target})

    def cut_over(self) -> None:
        self.daemon.generations.promote(self.new)
        self.phase = Phase.DRAINING
        self.last_progress = 0.0
        for generation in self.old:
            self.daemon.generations.drain(generation, sweep=False)
        self.owner.progress("ready", generation=self.new.id, workers=self.daemon.target)
        self.maybe_done()

    def maybe_done(self) -> None:
        if self.phase == Phase.DRAINING and not any(g.alive for g in self.old):
            self.owner.rolled_out(self.new)
        elif self.phase == Phase.ROLLING_BACK and not self.new.alive:
            self.owner.rolled_back(self.reason, self.output or self.new.last_lines(), generation=self.new.id)

    def on_exit(self, generation) -> None:
        if generation is self.new and self.phase in (Phase.BOOTING, Phase.SHRINKING_OLD, Phase.GROWING_NEW):
            self.regrow_old()
            self.phase = Phase.ROLLING_BACK
            self.reason = f"generation {self.new.id} exited before it was ready ({generation.exit_status})"
            self.output = generation.last_lines()
            self.owner.log.error("rolling_back", reason=self.reason)
        elif generation is self.new and self.phase == Phase.DRAINING:
            # Died after cutover while the old one drains: nothing serves. End now, so
            # crash recovery starts a generation at once instead of after the drain.
            self.owner.fail(protocol.FAILED, f"generation {self.new.id} exited after cutover "
                            f"({generation.exit_status}); crash recovery starts a new one",
                            generation=self.new.id, output=generation.last_lines())
            return
        self.maybe_done()

    def tick(self, now: float) -> None:
        if self.phase in (Phase.BOOTING, Phase.GROWING_NEW) and now > self.deadline:
            self.roll_back(f"generation {self.new.id} not ready within boot_timeout "
                           f"({self.daemon.cfg.boot_timeout} s)", "")
        elif self.phase == Phase.DRAINING and now - self.last_progress >= 1.0:
            self.last_progress = now
            left = sum(len(g.snapshot.get("workers", [])) for g in self.old if g.alive)
            self.owner.progress("draining", generations=[g.id for g in self.old if g.alive], workers_left=left)

    def regrow_old(self) -> None:
        """Rollback leaves the old generation whole: give back the workers a surge step took."""
        if self.phase in (Phase.SHRINKING_OLD, Phase.GROWING_NEW):
            self.shrinking.send({KIND: ToMaster.SCALE, "target": self.daemon.target})

    def roll_back(self, reason: str, output: str) -> None:
        self.regrow_old()
        self.phase = Phase.ROLLING_BACK
        self.reason = reason
        self.output = output
        self.owner.log.error("rolling_back", reason=reason)
        self.owner.progress("rolling_back", generation=self.new.id, reason=reason)
        self.new.rolled_back = True
        self.daemon.generations.drain(self.new, sweep=False, hard_after=min(5.0, self.daemon.cfg.graceful_timeout))


class Upgrade(Operation):
    """Start generation N+1 from a fresh exec; once every worker is ready, drain
    generation N. If N+1 exits, fails to boot or is not ready within
    boot_timeout, it is stopped, N keeps serving untouched, and the reply is
    rolled_back with the reason and N+1's last output."""

    name = "upgrade"
    reloads_service = True

    def start(self) -> None:
        self.rollout = Rollout(self, extra_env=self.args.get("env"))
        self.rollout.start()

    def on_message(self, generation, message: dict) -> None:
        self.rollout.on_message(generation, message)

    def on_exit(self, generation) -> None:
        self.rollout.on_exit(generation)

    def tick(self, now: float) -> None:
        self.rollout.tick(now)

    def rolled_out(self, generation) -> None:
        self.succeed(generation=generation.id, seconds=self.elapsed())

    def rolled_back(self, reason: str, output: str, **where) -> None:
        self.fail(protocol.ROLLED_BACK, f"{self.name} rolled back: {reason}", reason=reason, **where, output=output)


class Start(Upgrade):
    """The first generation: an upgrade from nothing."""

    name = "start"
    reloads_service = False  # the first generation: systemd hears READY=1 once it serves
