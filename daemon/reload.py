"""reload: re-read and validate the config file, then replace the workers."""

from __future__ import annotations

from appdctl import protocol

from .config import BY_NAME, ConfigError
from .messages import KIND, ToDaemon, ToMaster, kind_of
from .operations import Operation
from .upgrade import Rollout


class Reload(Operation):
    """Re-read and validate the config file (an invalid file changes nothing and
    is reported), then replace the workers: new ones ready first, old ones
    drained after. The serving master does that in place; a change of
    listeners (bind, backlog) is applied through a new generation instead
    (a Rollout, as upgrade does), the new listeners opened beside the old
    ones and the unused old ones closed only once it serves."""

    name = "reload"
    reloads_service = True
    metrics_moved = False  # metrics_bind changed: a new metrics listener waits for the reload's end

    def start(self) -> None:
        daemon = self.daemon
        try:
            new_cfg = daemon.read_config()
        except ConfigError as exc:
            self.fail(protocol.FAILED, f"config not reloaded, nothing changed: {exc}")
            return
        self.previous_cfg, self.previous_target = daemon.cfg, daemon.target
        self.new_cfg = new_cfg
        self.changed = sorted(k for k in new_cfg.values if new_cfg.values[k] != daemon.cfg.values.get(k))
        self.new_target = new_cfg.workers if new_cfg.workers != daemon.cfg.workers else daemon.target
        self.notes = self.notes_for(new_cfg)
        self.rollout = self.listener_change = None
        if not self.open_metrics_listener():
            return
        if daemon.listeners.differ(new_cfg, daemon.cfg) or daemon.serving is None:
            self.apply_through_new_generation()
        else:
            self.replace_workers_in_place()

    def notes_for(self, new_cfg) -> list[str]:
        notes = []
        if new_cfg.workers != self.previous_cfg.workers:
            notes.append(f"workers changed in the config: target is now {new_cfg.workers}")
        later = [k for k in self.changed if BY_NAME[k].needs_upgrade]
        if later:
            verb = "takes" if len(later) == 1 else "take"
            notes.append(f"{' and '.join(later)} {verb} effect at the next upgrade")
        if new_cfg.preload_app:
            notes.append("preload_app is on: workers were re-forked from the code the master "
                         "loaded; run `appdctl upgrade` to load new code")
        return notes

    # --- metrics_bind: the daemon's own listener ---

    def open_metrics_listener(self) -> bool:
        """A changed metrics_bind is bound now, beside the old one (a failure changes
        nothing); the reload's end keeps one of the two."""
        self.new_health, self.metrics_moved = None, self.new_cfg.metrics_bind != self.previous_cfg.metrics_bind
        if not self.metrics_moved:
            return True
        try:
            self.new_health = self.daemon.open_metrics_listener(self.new_cfg.metrics_bind)
        except OSError as exc:
            self.metrics_moved = False
            self.fail(protocol.FAILED, f"config not reloaded, nothing changed: metrics_bind "
                      f"{self.new_cfg.metrics_bind}: {exc.strerror or exc}")
            return False
        return True

    def settle_metrics_listener(self, ok: bool) -> None:
        if not self.metrics_moved:
            return
        self.metrics_moved = False
        closing = self.daemon.health if ok else self.new_health
        if ok:
            self.daemon.health = self.new_health
        if closing is not None:
            closing.shutdown()

    def succeed(self, outcome: str = "done", **result) -> None:
        self.settle_metrics_listener(True)
        super().succeed(outcome, **result)

    def fail(self, code: str, message: str, **extra) -> None:
        self.settle_metrics_listener(False)
        super().fail(code, message, **extra)

    # --- in place: the serving master replaces its workers ---

    def replace_workers_in_place(self) -> None:
        daemon = self.daemon
        serving = daemon.serving
        daemon.apply_config(self.new_cfg, self.new_target)
        self.generation = serving
        self.deadline = daemon.clock() + self.new_cfg.boot_timeout + self.new_cfg.graceful_timeout
        serving.send({KIND: ToMaster.SCALE, "target": self.new_target})
        serving.send({KIND: ToMaster.RELOAD, "settings": daemon.generation_settings()})
        self.progress("replacing_workers", generation=serving.id, target=self.new_target, changed=self.changed)

    def on_reloaded(self, generation, message: dict) -> None:
        if message.get("ok"):
            self.succeed(generation=generation.id, notes=self.notes, changed=self.changed, seconds=self.elapsed())
        else:
            self.keep_previous_config()
            self.fail(protocol.FAILED, f"reload failed, old workers kept: {message.get('reason')}",
                      output=message.get("output", ""))

    def keep_previous_config(self) -> None:
        """The master went back to its old settings; so does the daemon, or the next
        generation (an upgrade, a crash recovery) would start from the failed config.
        The worker target stays where the master has it: scale is the way to change it."""
        self.daemon.apply_config(self.previous_cfg, self.daemon.target)

    # --- through a new generation: the listeners change ---

    def apply_through_new_generation(self) -> None:
        daemon = self.daemon
        try:
            self.listener_change = daemon.listeners.change(self.new_cfg)
        except OSError as exc:
            self.fail(protocol.FAILED, f"config not reloaded, nothing changed: {exc}")
            return
        daemon.apply_config(self.new_cfg, self.new_target)
        self.notes.append("listeners changed: applied with a new generation")
        self.rollout = Rollout(self)
        self.rollout.start()

    def rolled_out(self, generation) -> None:
        self.listener_change.commit()
        self.succeed(generation=generation.id, seconds=self.elapsed(), notes=self.notes, changed=self.changed)

    def rolled_back(self, reason: str, output: str, **where) -> None:
        self.listener_change.abort()
        self.daemon.apply_config(self.previous_cfg, self.previous_target)
        self.fail(protocol.ROLLED_BACK, f"reload rolled back: {reason}", reason=reason, **where, output=output)

    # --- events ---

    def on_message(self, generation, message: dict) -> None:
        if self.rollout is not None:
            self.rollout.on_message(generation, message)
        elif generation is self.generation and kind_of(message) == ToDaemon.WORKER_READY:
            self.progress("booting", ready=message["ready"], target=message["target"])
        elif generation is self.generation and kind_of(message) == ToDaemon.RELOADED:
            self.on_reloaded(generation, message)

    def on_exit(self, generation) -> None:
        if self.rollout is not None:
            self.rollout.on_exit(generation)
        elif generation is self.generation:
            self.keep_previous_config()
            self.fail(protocol.FAILED, f"generation {generation.id} exited during reload "
                      f"({generation.exit_status})", output=generation.last_lines())

    def tick(self, now: float) -> None:
        if self.rollout is not None:
            self.rollout.tick(now)
        elif now > self.deadline:
            self.fail(protocol.TIMEOUT, "reload did not finish within boot_timeout + graceful_timeout")
