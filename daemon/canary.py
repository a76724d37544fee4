"""Watched upgrades: probation after cutover, and canaries.

probation: after cutover the old generation *stands by* (ToMaster.PAUSE: its
workers stop accepting, hand their idle keep-alive connections to the new
generation and finish in-flight work, but stay alive with the app they
loaded). The new generation's outcomes are watched for `probation` seconds.
Over the limits, the old one *resumes* (ToMaster.RESUME: accepting again at
once, no boot, running the code it had loaded even if the release rewrote
the files in place) and only then does the new one drain, handing its idle
connections back: zero downtime both ways. Command workers (foreign
programs) cannot be paused: their generation stands by at 0 workers and
resumes by forking them again (ready_after_resume waits for that).

canary (`upgrade --canary N`): the new generation starts with N workers that
accept beside the whole old generation for `probation` seconds; healthy, it
grows to the target and the old one drains (within max_surge); not, it is
drained and the old generation never stopped serving. `--hold` ends the
operation with the canary running; `appdctl promote` / `appdctl rollback`
end it later (also after a daemon re-exec: the generation's state says
canary, and its outcomes travel with it).

The state machine is a Rollout with three more phases (Watch); the decision
itself is probation.verdict, a pure function.
"""

from __future__ import annotations

from enum import StrEnum

from appdctl import protocol

from .generation import CANARY, SERVING, STANDBY
from .handoff import takes_handoff
from .messages import KIND, ToDaemon, ToMaster, kind_of
from .probation import Limits, verdict
from .upgrade import Phase, Rollout, Upgrade

_REPORT = {"report_outcomes": True}  # the new generation's workers report failing paths
_PROGRESS_EVERY = 1.0


class Watch(StrEnum):
    """The phases a watched rollout adds to upgrade.Phase."""

    CANARY = "canary"        # N new workers serve beside the whole old generation
    PROBATION = "probation"  # cut over; the old generation stands by
    RESUMING = "resuming"    # rolling back after cutover: the old one accepts again first


WATCHING = (Watch.CANARY, Watch.PROBATION)


def held_canary(daemon):
    """A canary, or a standing-by generation, left by an upgrade that ended `held`."""
    return next((g for g in daemon.generations if g.state in (CANARY, STANDBY) and g.alive), None)


def pauses(cfg) -> bool:
    """Whether a generation's workers can stand by paused (all but foreign programs)."""
    return cfg.worker_class != "command"


def upgrade_operation(daemon, responder, args: dict):
    """The upgrade asked for (command or SIGUSR2): plain, or watched (probation, canary)."""
    canary = args.get("canary")
    canary = daemon.cfg.canary_workers if canary is None else canary
    if canary or args.get("hold") or daemon.cfg.probation > 0 or held_canary(daemon):
        return ProbationUpgrade(daemon, responder, {**args, "canary": canary or 0})
    return Upgrade(daemon, responder, args)


class WatchedRollout(Rollout):
    """A Rollout whose new generation is watched on real traffic before the old one goes."""

    def __init__(self, owner, extra_env: dict | None, canary: int, window: float, hold: bool):
        super().__init__(owner, extra_env)
        self.canary, self.window, self.hold = canary, window, hold
        self.limits = Limits.of(self.daemon.cfg)
        self.standing_by: list = []
        self.evidence: dict | None = None  # what was observed when it was rejected
        self.observed_result: dict = {}    # what was observed when it was accepted

    def start(self) -> None:
        super().start()
        if self.canary and self.phase is not None:
            self.new_target = self.canary

    def spawn_new(self, target: int):
        return self.daemon.generations.start(extra_env=self.extra_env, target=self.canary or target,
                                             settings=_REPORT)

    def adopt_held(self, canary) -> None:
        """A canary or standing-by generation held by an earlier upgrade (maybe before a
        daemon re-exec): watch it again."""
        daemon = self.daemon
        if canary.state == STANDBY:
            self.adopt_standby()
            return
        self.new, self.canary, self.window, self.hold = canary, len(canary.worker_pids) or 1, 0.0, False
        self.new_target = max(1, canary.snapshot.get("target") or self.canary)
        self.old = [g for g in daemon.generations if g.alive and g is not canary]
        self.shrinking = daemon.serving
        self.begin_watch(Watch.CANARY)

    def adopt_standby(self) -> None:
        daemon = self.daemon
        self.new, self.canary, self.window, self.hold = daemon.serving, 0, 0.0, False
        self.new_target = daemon.target
        self.standing_by = [g for g in daemon.generations if g.state == STANDBY and g.alive]
        self.old = list(self.standing_by)
        self.begin_watch(Watch.PROBATION)

    # --- messages, exits, time ---

    def on_message(self, generation, message: dict) -> None:
        kind = kind_of(message)
        if self.phase == Phase.BOOTING and self.canary and generation is self.new and kind == ToDaemon.READY:
            self.begin_watch(Watch.CANARY)
        elif self.phase == Watch.RESUMING and generation in self.standing_by and kind == ToDaemon.WORKERS:
            if generation.snapshot.get("ready", 0) >= self.daemon.target:
                self.resumed(generation)
        else:
            super().on_message(generation, message)

    def on_exit(self, generation) -> None:
        if generation is self.new and self.phase in WATCHING:
            self.reject(f"generation {generation.id} exited during {self.phase} ({generation.exit_status})")
        elif generation in self.standing_by and self.phase == Watch.RESUMING \
                and not any(g.alive for g in self.standing_by):
            self.owner.fail(protocol.FAILED, f"could not roll back: generation {generation.id} exited while "
                            f"resuming ({generation.exit_status}); {self.reason}", evidence=self.evidence)
        else:
            super().on_exit(generation)

    def tick(self, now: float) -> None:
        if self.phase in WATCHING:
            self.watch(now)
        elif self.phase == Watch.RESUMING and now > self.deadline:
            self.owner.fail(protocol.FAILED, "could not roll back: the old generation was not ready again "
                            f"within boot_timeout; the new one keeps serving. {self.reason}", evidence=self.evidence)
        else:
            super().tick(now)

    # --- watching ---

    def cut_over(self) -> None:
        if self.window <= 0 or self.canary:  # a promoted canary has had its probation
            super().cut_over()
            return
        self.daemon.generations.promote(self.new)
        self.standing_by = [g for g in self.old if g.state == SERVING]
        for generation in self.standing_by:
            generation.state = STANDBY
            self.stand_by(generation)
        self.begin_watch(Watch.PROBATION)

    def stand_by(self, generation) -> None:
        """Stop accepting, hand idle connections on, keep the workers (or, for command
        workers, which cannot pause, keep only the master)."""
        cfg = self.daemon.cfg
        if pauses(cfg):
            generation.send({KIND: ToMaster.PAUSE, "handoff": takes_handoff(cfg.worker_class)})
        else:
            generation.send({KIND: ToMaster.SCALE, "target": 0})

    def begin_watch(self, phase: Watch) -> None:
        now = self.daemon.clock()
        self.phase = phase
        self.watch_started, self.deadline, self.last_progress = now, now + self.window, now
        if phase == Watch.CANARY:
            self.new.state = CANARY
        self.owner.progress(str(phase), generation=self.new.id, workers=self.new_target, probation_s=self.window,
                            **self.new.outcomes.counts())
        if self.window <= 0 and self.hold:
            self.end_held()

    def watch(self, now: float) -> None:
        reason = verdict(self.new.outcomes, self.limits)
        if reason:
            self.reject(reason)
            return
        if now - self.last_progress >= _PROGRESS_EVERY:
            self.last_progress = now
            self.owner.progress(str(self.phase), generation=self.new.id,
                                left_s=round(max(0.0, self.deadline - now), 1), **self.new.outcomes.counts())
        if now >= self.deadline:
            self.end_held() if self.hold else self.accept()

    def decide(self, action: str) -> bool:
        if self.phase not in WATCHING:
            return False
        if action == "promote":
            self.accept()
        else:
            self.reject("rolled back by the operator (appdctl rollback)")
        return True

    def observed(self) -> dict:
        return {**self.new.outcomes.evidence(), "watched_s": round(self.daemon.clock() - self.watch_started, 3)}

    def end_held(self) -> None:
        self.owner.succeed(outcome="held", generation=self.new.id, canary_workers=self.new_target,
                           observed=self.observed(), next="appdctl promote | appdctl rollback")

    # --- healthy: the new generation takes over ---

    def accept(self) -> None:
        self.observed_result = {"observed": self.observed()}
        if self.new.outcomes.requests < self.limits.min_requests:
            # e.g. keep-alive clients stay on the old workers: a canary only sees new connections
            self.observed_result["notes"] = [
                f"inconclusive: the new generation answered {self.new.outcomes.requests} requests, fewer than "
                f"rollback_min_requests ({self.limits.min_requests}); only crashes could have rolled it back"]
        if self.phase == Watch.CANARY:
            self.promote_canary()
            return
        self.phase = Phase.DRAINING  # probation passed: the standing-by generation goes as after any upgrade
        for generation in self.standing_by:
            self.daemon.generations.drain(generation, sweep=False)
        self.owner.progress("ready", generation=self.new.id, workers=self.daemon.target)
        self.maybe_done()

    def promote_canary(self) -> None:
        target = self.daemon.target
        self.owner.progress("promoting", generation=self.new.id, workers=self.new_target, target=target)
        surge = self.daemon.cfg.max_surge
        self.step = min(surge or target, target)
        if self.new_target >= target:
            super().cut_over()
        elif surge and surge < target and self.shrinking is not None:
            self.shrink_old()
        else:
            self.phase = Phase.GROWING_NEW
            self.new_target = target
            self.deadline = self.daemon.clock() + self.daemon.cfg.boot_timeout
            self.new.send({KIND: ToMaster.SCALE, "target": target})

    # --- over the limits: back to the old generation ---

    def reject(self, reason: str) -> None:
        self.evidence = self.observed()
        self.reason, self.output = reason, self.new.last_lines()
        self.owner.log.error("probation_failed", generation=self.new.id, reason=reason, **self.new.outcomes.counts())
        self.owner.progress("probation_failed", generation=self.new.id, reason=reason, evidence=self.evidence)
        if self.phase == Watch.CANARY:
            self.roll_back(reason, self.output)  # the old generation never stopped serving
            self.maybe_done()
        else:
            self.resume_old()

    def resume_old(self) -> None:
        live = [g for g in self.standing_by if g.alive]
        if not live:
            self.owner.fail(protocol.FAILED, f"{self.reason}; cannot roll back: the old generation is gone, the "
                            "new one keeps serving", evidence=self.evidence, output=self.output)
            return
        self.phase = Watch.RESUMING
        target = self.daemon.target
        self.deadline = self.daemon.clock() + self.daemon.cfg.boot_timeout
        for generation in live:
            generation.send({KIND: ToMaster.RESUME})
            generation.send({KIND: ToMaster.SCALE, "target": target})  # a no-op unless it stood by at 0
        self.owner.progress("resuming", generations=[g.id for g in live], target=target)
        ready = next((g for g in live if self.ready_after_resume(g)), None)
        if ready is not None:
            self.resumed(ready)  # paused workers accept again at once: no boot to wait for

    def ready_after_resume(self, generation) -> bool:
        """Paused workers are ready as they are; a generation that stood by at 0 workers
        (command workers) is ready once its master reports the target forked again."""
        return pauses(self.daemon.cfg) and generation.snapshot.get("ready", 0) >= self.daemon.target

    def resumed(self, generation) -> None:
        """The old generation accepts again: only now does the new one drain (zero downtime)."""
        self.daemon.generations.promote(generation)
        for other in self.standing_by:
            if other is not generation and other.alive:
                self.daemon.generations.drain(other, sweep=False)
        self.roll_back(self.reason, self.output)
        self.maybe_done()


class ProbationUpgrade(Upgrade):
    """An upgrade whose new generation is watched (WatchedRollout); also the
    operation of `appdctl promote` / `rollback` of a held canary (for_held)."""

    def __init__(self, daemon, responder, args: dict | None = None):
        super().__init__(daemon, responder, args)
        self.canary = self.args.get("canary") or 0
        self.hold = bool(self.args.get("hold"))
        self.watchers: list = []  # (action, responder) of promote/rollback commands that decided
        self.adopted = None       # (held canary generation, action)

    @classmethod
    def for_held(cls, daemon, responder, canary, action: str) -> "ProbationUpgrade":
        operation = cls(daemon, responder, {})
        operation.name = action
        operation.adopted = (canary, action)
        return operation

    def start(self) -> None:
        self.rollout = WatchedRollout(self, self.args.get("env"), self.canary, self.daemon.cfg.probation, self.hold)
        if self.adopted:
            canary, action = self.adopted
            self.rollout.adopt_held(canary)
            self.rollout.decide(action)
            return
        problem = self.refusal()
        if problem:
            self.fail(*problem)
            return
        self.rollout.start()

    def refusal(self) -> tuple[str, str] | None:
        held = held_canary(self.daemon)
        if held is not None:
            return protocol.BUSY, (f"generation {held.id} is held ({held.state}): `appdctl promote` or "
                                   "`appdctl rollback` first")
        if self.canary and self.daemon.serving is None:
            return protocol.BAD_REQUEST, "upgrade --canary: no generation is serving beside which to run it"
        if self.canary and not self.hold and self.daemon.cfg.probation <= 0:
            return protocol.BAD_REQUEST, ("upgrade --canary needs probation > 0 (the seconds the canary "
                                          "is watched) or --hold")
        return None

    def decide(self, action: str, responder) -> bool:
        """promote / rollback by hand while watching; False when there is nothing to decide."""
        if self.rollout.phase not in WATCHING:
            return False
        self.watchers.append((action, responder))
        return self.rollout.decide(action)

    # --- the outcomes ---

    def rolled_out(self, generation) -> None:
        self.succeed(generation=generation.id, seconds=self.elapsed(), **self.rollout.observed_result)

    def rolled_back(self, reason: str, output: str, **where) -> None:
        evidence = self.rollout.evidence
        if evidence is None:  # it failed before it was watched: an upgrade's plain rollback
            super().rolled_back(reason, output, **where)
        elif self.adopted:    # `appdctl rollback` of a held canary: what was asked is done
            self.succeed(outcome="rolled_back", reason=reason, **where, evidence=evidence, output=output)
        else:
            self.fail(protocol.ROLLED_BACK, f"{self.name} rolled back: {reason}", reason=reason, **where,
                      evidence=evidence, output=output)

    # --- promote/rollback commands that decided get the outcome too ---

    def succeed(self, outcome: str = "done", **result) -> None:
        if self.finished:
            return
        super().succeed(outcome, **result)
        for _, responder in self.watchers:
            responder.done({"outcome": outcome, **result})

    def fail(self, code: str, message: str, **extra) -> None:
        if self.finished:
            return
        super().fail(code, message, **extra)
        for action, responder in self.watchers:
            if action == "rollback" and code == protocol.ROLLED_BACK:
                responder.done({"outcome": "rolled_back", **extra})
            else:
                responder.fail(code, message, **extra)


def decide_by_hand(daemon, action: str, responder) -> None:
    """promote / rollback: decide a running probation or canary, or a held canary."""
    running = daemon.operation
    if isinstance(running, ProbationUpgrade) and running.decide(action, responder):
        return
    held = held_canary(daemon)
    if held is None:
        if running is not None:
            responder.fail(protocol.BUSY, f"{running.name} is running and is not on probation")
        else:
            responder.fail(protocol.FAILED, f"nothing to {action}: no canary is held and no probation is running")
        return
    daemon.begin(ProbationUpgrade.for_held(daemon, responder, held, action))
