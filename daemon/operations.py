"""Changing operations: each is a small state machine that the daemon drives
with generation messages, generation exits and clock ticks. Only one runs at
a time. Each streams progress to its Responder and ends with exactly one of
succeed() or fail()."""

from __future__ import annotations

import os
import signal
import time

import msgpack
from appdctl import protocol

from . import proc, reexec
from .config import BY_NAME, ConfigError


class Operation:
    name = "operation"
    reloads_service = False  # says RELOADING=1 to systemd when it begins, READY=1 when it ends

    def __init__(self, daemon, responder, args: dict | None = None):
        self.daemon = daemon
        self.responder = responder
        self.args = args or {}
        self.started = time.monotonic()
        self.finished = False

    @property
    def log(self):
        return self.daemon.log.bind(op=self.name)

    def start(self) -> None:
        raise NotImplementedError

    def on_message(self, generation, message: dict) -> None:
        pass

    def on_exit(self, generation) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def on_child_exit(self, pid: int, status: int) -> None:
        """A child that is not a master exited (e.g. a probe this operation started)."""

    def progress(self, name: str, **fields) -> None:
        self.log.info(name, **fields)
        self.responder.event(name, **fields)

    def succeed(self, outcome: str = "done", **result) -> None:
        self.daemon.finish_operation(self, True, outcome, None, {"outcome": outcome, **result})

    def fail(self, code: str, message: str, **extra) -> None:
        self.daemon.finish_operation(self, False, code, {"code": code, "message": message, **extra}, None)


class Upgrade(Operation):
    """Start generation N+1 from a fresh exec; once every worker is ready, drain
    generation N. If N+1 exits, fails to boot or is not ready within
    boot_timeout, it is stopped, N keeps serving untouched, and the reply is
    rolled_back with the reason and N+1's last output."""

    name = "upgrade"
    reloads_service = True
    # Set by Reload when it applies new listeners through an upgrade.
    after_success = None
    after_failure = None
    extra_result: dict = {}

    def start(self) -> None:
        daemon = self.daemon
        self.old = [g for g in daemon.generations if g.alive]
        # max_surge: the new generation starts with `step` workers and grows as the
        # serving one shrinks, so at most target + step workers run at once.
        self.shrinking = daemon.serving
        self.step = min(daemon.cfg.max_surge or daemon.target, daemon.target) if self.shrinking else daemon.target
        self.new_target = self.step
        try:
            self.new = self.spawn_new(self.step)
        except OSError as exc:
            self._restore()
            self.fail(protocol.ROLLED_BACK, f"{self.name} rolled back: {exc}", reason=str(exc), output="")
            return
        self.phase = "booting"
        self.deadline = time.monotonic() + daemon.cfg.boot_timeout
        self.progress("spawned", generation=self.new.id, master_pid=self.new.pid, target=daemon.target)

    def spawn_new(self, target: int):
        """The new generation (a probation upgrade asks its workers to report outcomes)."""
        return self.daemon.start_generation(extra_env=self.args.get("env"), target=target)

    def on_message(self, generation, message: dict) -> None:
        if self.phase in ("shrinking_old", "growing_new"):
            self.on_surge_message(generation, message)
            return
        if generation is not self.new or self.phase != "booting":
            return
        kind = message.get("t")
        if kind == "worker_ready":
            self.progress("booting", generation=self.new.id, ready=message["ready"], target=message["target"])
        elif kind == "ready":
            self.cut_over() if self.new_target >= self.daemon.target else self.shrink_old()
        elif kind == "boot_failed":
            self.roll_back(message.get("reason", "boot failed"), message.get("output", ""))

    # --- max_surge: step by step, never fewer ready than target, never more than target + step ---

    def on_surge_message(self, generation, message: dict) -> None:
        if message.get("t") != "workers" or generation not in (self.new, self.shrinking):
            return
        if self.phase == "shrinking_old":
            if len(self.shrinking.snapshot.get("workers", [])) <= self.daemon.target - self.new_target:
                self.grow_new()
        elif self.phase == "growing_new" and self.new.snapshot.get("ready", 0) >= self.new_target:
            self.cut_over() if self.new_target >= self.daemon.target else self.shrink_old()

    def shrink_old(self) -> None:
        self.phase = "shrinking_old"
        left = self.daemon.target - self.new_target
        self.progress("surge", generation=self.new.id, new_workers=self.new_target, old_workers=left)
        self.shrinking.send({"t": "scale", "target": left})

    def grow_new(self) -> None:
        self.phase = "growing_new"
        self.new_target = min(self.daemon.target, self.new_target + self.step)
        self.deadline = time.monotonic() + self.daemon.cfg.boot_timeout
        self.new.send({"t": "scale", "target": self.new_target})

    def cut_over(self) -> None:
        self.daemon.promote(self.new)
        self.phase = "draining"
        self.last_progress = 0.0
        for generation in self.old:
            self.daemon.drain_generation(generation, sweep=False)
        self.progress("ready", generation=self.new.id, workers=self.daemon.target)
        self.maybe_done()

    def maybe_done(self) -> None:
        if self.phase == "draining" and not any(g.alive for g in self.old):
            if self.after_success:
                self.after_success()
            self.succeed(generation=self.new.id, seconds=round(time.monotonic() - self.started, 3),
                         **self.extra_result)
        elif self.phase == "rolling_back" and not self.new.alive:
            self._restore()
            self.fail(protocol.ROLLED_BACK, f"{self.name} rolled back: {self.reason}", reason=self.reason,
                      generation=self.new.id, output=self.output or self.new.last_lines())

    def on_exit(self, generation) -> None:
        if generation is self.new and self.phase in ("booting", "shrinking_old", "growing_new"):
            self.regrow_old()
            self.phase = "rolling_back"
            self.reason = f"generation {self.new.id} exited before it was ready ({generation.exit_status})"
            self.output = generation.last_lines()
            self.log.error("rolling_back", reason=self.reason)
        elif generation is self.new and self.phase == "draining":
            # Died after cutover while the old one drains: nothing serves. End now, so
            # crash recovery starts a generation at once instead of after the drain.
            self.fail(protocol.FAILED, f"generation {self.new.id} exited after cutover "
                      f"({generation.exit_status}); crash recovery starts a new one",
                      generation=self.new.id, output=generation.last_lines())
            return
        self.maybe_done()

    def tick(self, now: float) -> None:
        if self.phase in ("booting", "growing_new") and now > self.deadline:
            self.roll_back(f"generation {self.new.id} not ready within boot_timeout "
                           f"({self.daemon.cfg.boot_timeout} s)", "")
        elif self.phase == "draining" and now - self.last_progress >= 1.0:
            self.last_progress = now
            left = sum(len(g.snapshot.get("workers", [])) for g in self.old if g.alive)
            self.progress("draining", generations=[g.id for g in self.old if g.alive], workers_left=left)

    def regrow_old(self) -> None:
        """Rollback leaves the old generation whole: give back the workers a surge step took."""
        if self.phase in ("shrinking_old", "growing_new"):
            self.shrinking.send({"t": "scale", "target": self.daemon.target})

    def roll_back(self, reason: str, output: str) -> None:
        self.regrow_old()
        self.phase = "rolling_back"
        self.reason = reason
        self.output = output
        self.log.error("rolling_back", reason=reason)
        self.progress("rolling_back", generation=self.new.id, reason=reason)
        self.new.rolled_back = True
        self.daemon.drain_generation(self.new, sweep=False, hard_after=min(5.0, self.daemon.cfg.graceful_timeout))

    def _restore(self) -> None:
        if self.after_failure:
            self.after_failure()


class Reload(Operation):
    """Re-read and validate the config file (an invalid file changes nothing and
    is reported), then replace the workers: new ones ready first, old ones
    drained after. A change of listeners is applied with a new generation."""

    name = "reload"
    reloads_service = True

    def start(self) -> None:
        daemon = self.daemon
        try:
            new_cfg = daemon.read_config()
        except ConfigError as exc:
            self.fail(protocol.FAILED, f"config not reloaded, nothing changed: {exc}")
            return
        self.notes = []
        changed = sorted(k for k in new_cfg.values if new_cfg.values[k] != daemon.cfg.values.get(k))
        self.new_target = daemon.target
        if new_cfg.workers != daemon.cfg.workers:
            self.new_target = new_cfg.workers
            self.notes.append(f"workers changed in the config: target is now {new_cfg.workers}")
        later = [k for k in changed if BY_NAME[k].needs_upgrade]
        if later:
            verb = "takes" if len(later) == 1 else "take"
            self.notes.append(f"{' and '.join(later)} {verb} effect at the next upgrade")
        if new_cfg.preload_app:
            self.notes.append("preload_app is on: workers were re-forked from the code the master "
                              "loaded; run `appdctl upgrade` to load new code")
        self.new_cfg = new_cfg
        self.changed = changed
        serving = daemon.serving
        if daemon.bind_specs(new_cfg) != daemon.bind_specs(daemon.cfg) or new_cfg.backlog != daemon.cfg.backlog or serving is None:
            self._reload_by_upgrade()
            return
        self.previous_cfg = daemon.cfg
        daemon.apply_config(new_cfg, self.new_target)
        self.generation = serving
        self.deadline = time.monotonic() + new_cfg.boot_timeout + new_cfg.graceful_timeout
        serving.send({"t": "scale", "target": self.new_target})
        serving.send({"t": "reload", "settings": daemon.generation_settings()})
        self.progress("replacing_workers", generation=serving.id, target=self.new_target, changed=changed)

    def _reload_by_upgrade(self) -> None:
        daemon = self.daemon
        old_cfg, old_target, old_listeners = daemon.cfg, daemon.target, daemon.listeners
        try:
            daemon.apply_config(self.new_cfg, self.new_target, open_listeners=True)
        except OSError as exc:
            daemon.apply_config(old_cfg, old_target)
            self.fail(protocol.FAILED, f"config not reloaded, nothing changed: {exc}")
            return
        self.notes.append("listeners changed: applied with a new generation")
        upgrade = Upgrade(daemon, self.responder, {})
        upgrade.name = "reload"
        upgrade.after_success = lambda: daemon.close_unused_listeners(old_listeners)
        upgrade.after_failure = lambda: daemon.restore_config(old_cfg, old_target, old_listeners)
        upgrade.extra_result = {"notes": self.notes, "changed": self.changed}
        daemon.operation = upgrade
        upgrade.start()

    def on_message(self, generation, message: dict) -> None:
        if generation is not self.generation:
            return
        if message.get("t") == "worker_ready":
            self.progress("booting", ready=message["ready"], target=message["target"])
        elif message.get("t") == "reloaded":
            if message.get("ok"):
                self.succeed(generation=generation.id, notes=self.notes, changed=self.changed,
                             seconds=round(time.monotonic() - self.started, 3))
            else:
                self._keep_previous_config()
                self.fail(protocol.FAILED, f"reload failed, old workers kept: {message.get('reason')}",
                          output=message.get("output", ""))

    def _keep_previous_config(self) -> None:
        """The master went back to its old settings; so does the daemon, or the next
        generation (an upgrade, a crash recovery) would start from the failed config.
        The worker target stays where the master has it: scale is the way to change it."""
        self.daemon.apply_config(self.previous_cfg, self.daemon.target)

    def on_exit(self, generation) -> None:
        if generation is self.generation:
            self._keep_previous_config()
            self.fail(protocol.FAILED, f"generation {generation.id} exited during reload "
                      f"({generation.exit_status})", output=generation.last_lines())

    def tick(self, now: float) -> None:
        if now > self.deadline:
            self.fail(protocol.TIMEOUT, "reload did not finish within boot_timeout + graceful_timeout")


class Scale(Operation):
    """Change the target worker count (+N, -N or N). The daemon keeps the
    target, so it survives reload and upgrade. Done when the serving
    generation has exactly that many ready workers."""

    name = "scale"

    def start(self) -> None:
        daemon = self.daemon
        before = daemon.target
        wanted = self.args["count"] if self.args.get("count") is not None else before + (self.args.get("delta") or 0)
        limit = daemon.cfg.max_workers
        if wanted < 1 or wanted > limit:
            self.fail(protocol.BAD_REQUEST, f"cannot scale to {wanted} workers: the target must be "
                      f"between 1 and max_workers ({limit})", target=before)
            return
        daemon.target = wanted
        self.wanted, self.before = wanted, before
        self.generation = daemon.serving
        self.deadline = time.monotonic() + daemon.cfg.boot_timeout + daemon.cfg.graceful_timeout
        if self.generation is None:
            self.succeed(target=wanted, previous=before, note="no serving generation: the target "
                         "applies to the next one")
            return
        self.progress("scaling", previous=before, target=wanted)
        self.generation.send({"t": "scale", "target": wanted})

    def on_message(self, generation, message: dict) -> None:
        if generation is not self.generation or message.get("t") != "workers":
            return
        active = [w for w in message["workers"] if w["state"] != "stopping"]
        if message["ready"] == self.wanted and len(active) == self.wanted:
            self.succeed(target=self.wanted, previous=self.before,
                         seconds=round(time.monotonic() - self.started, 3))

    def on_exit(self, generation) -> None:
        if generation is self.generation:
            self.fail(protocol.FAILED, f"generation {generation.id} exited while scaling")

    def tick(self, now: float) -> None:
        if now > self.deadline:
            self.fail(protocol.TIMEOUT, f"{self.wanted} workers were not ready in time; the target stays "
                      f"{self.wanted}", target=self.wanted)


class Retire(Operation):
    """Gracefully replace one worker: a new one is started, and when it is ready
    the old one finishes its request and exits."""

    name = "retire"

    def start(self) -> None:
        pid = self.args["pid"]
        self.pid = pid
        self.generation = next((g for g in self.daemon.generations if g.alive and pid in g.worker_pids), None)
        if self.generation is None:
            self.fail(protocol.FAILED, f"no worker with pid {pid}")
            return
        self.deadline = time.monotonic() + self.daemon.cfg.boot_timeout + self.daemon.cfg.graceful_timeout
        self.generation.send({"t": "retire", "pid": pid})

    def on_message(self, generation, message: dict) -> None:
        if generation is not self.generation:
            return
        if message.get("t") == "retired" and not message.get("ok"):
            self.fail(protocol.FAILED, message.get("reason", "cannot retire"))
        elif message.get("t") == "workers" and self.pid not in generation.worker_pids:
            self.succeed(pid=self.pid, generation=generation.id)

    def on_exit(self, generation) -> None:
        if generation is self.generation:
            self.fail(protocol.FAILED, f"generation {generation.id} exited")

    def tick(self, now: float) -> None:
        if now > self.deadline:
            self.fail(protocol.TIMEOUT, f"worker {self.pid} was not replaced in time")


class Shutdown(Operation):
    """drain (graceful: serve the backlog and in-flight requests, then exit 0)
    or stop (quick). The daemon exits once every generation is gone."""

    name = "drain"

    delaying = False  # within drain_delay: not ready, still serving

    def start(self) -> None:
        self.quick = isinstance(self, Stop)
        self.last_progress = 0.0
        delay = 0.0 if self.quick else self.daemon.cfg.drain_delay
        if delay > 0:
            self.delaying = True
            self.daemon.begin_drain_delay(delay)
            self.progress("draining", phase="delay", delay_s=delay)
            return
        self.begin_draining()

    def cut_delay_short(self, why: str) -> None:
        self.log.info("drain_delay_cut_short", by=why)
        self.begin_draining()

    def begin_draining(self) -> None:
        daemon = self.daemon
        self.delaying = False
        timeout = self.args.get("timeout")
        grace = 2.0 if self.quick else (timeout if timeout is not None else daemon.cfg.graceful_timeout)
        daemon.begin_shutdown()
        for generation in [g for g in daemon.generations if g.alive]:
            if self.quick:
                daemon.stop_generation(generation, hard_after=grace)
            else:
                daemon.drain_generation(generation, sweep=True, hard_after=grace + 1.0, timeout=grace)
        self.progress("stopping" if self.quick else "draining", timeout=grace)
        self.maybe_done()

    def tick(self, now: float) -> None:
        if self.delaying:
            left = self.daemon.drain_delay_left()
            if not left:
                self.begin_draining()
            elif now - self.last_progress >= 0.5:
                self.last_progress = now
                self.progress("draining", phase="delay", left_s=round(left, 1))
            return
        if not self.quick and now - self.last_progress >= 0.5:
            self.last_progress = now
            left = sum(len(g.snapshot.get("workers", [])) for g in self.daemon.generations if g.alive)
            self.progress("draining", workers_left=left)

    def on_exit(self, generation) -> None:
        self.maybe_done()

    def maybe_done(self) -> None:
        if not self.delaying and not any(g.alive for g in self.daemon.generations):
            self.succeed(outcome="stopped" if self.quick else "drained",
                         seconds=round(time.monotonic() - self.started, 3))
            self.daemon.exit(0)


class Stop(Shutdown):
    """stop: quick shutdown (SIGQUIT semantics)."""

    name = "stop"


class Start(Upgrade):
    """The first generation: an upgrade from nothing."""

    name = "start"
    reloads_service = False  # the first generation: systemd hears READY=1 once it serves


class ReexecDaemon(Operation):
    """upgrade --daemon: the daemon execs its own new code in place, keeping
    its PID, listeners, control socket, clients and running generations. The
    new code is first imported in a child; if that fails, nothing changes."""

    name = "upgrade-daemon"
    reloads_service = True  # a re-exec that succeeds says READY=1 from the new code

    def start(self) -> None:
        try:
            state = msgpack.packb(reexec.snapshot(self.daemon), use_bin_type=True)
            self.probe_pid, self.probe_out = reexec.start_probe(state)
        except OSError as exc:
            self.fail(protocol.FAILED, f"daemon re-exec refused, the old daemon keeps running: {exc}")
            return
        self.deadline = time.monotonic() + 30.0
        self.progress("probing_new_code", pid=self.probe_pid)

    def on_child_exit(self, pid: int, status: int) -> None:
        if pid != self.probe_pid:
            return
        output = self._read_probe_output()
        if status != 0:
            self.fail(protocol.FAILED, "daemon re-exec refused, the old daemon keeps running: the new code "
                      f"failed to load ({proc.describe_exit(status)})", output=output)
            return
        self.progress("exec")
        client = getattr(self.responder, "client", None)
        reason = reexec.execute(self.daemon, client, getattr(self.responder, "request_id", None))
        self.fail(protocol.FAILED, f"daemon re-exec failed, the old daemon keeps running: {reason}")

    def _read_probe_output(self) -> str:
        chunks = []
        try:
            while chunk := os.read(self.probe_out, 65536):
                chunks.append(chunk)
        except BlockingIOError:
            pass
        os.close(self.probe_out)
        return b"".join(chunks).decode("utf-8", "replace")[-4000:]

    def tick(self, now: float) -> None:
        if now > self.deadline:
            os.kill(self.probe_pid, signal.SIGKILL)
            self.fail(protocol.FAILED, "daemon re-exec refused: the new code did not load within 30 s")
