"""The daemon's table of generations: it starts them, follows their messages
and exits, tells them to drain or stop, and SIGKILLs what overstays. What a
message or an exit means for the running operation or for crash recovery is
passed on to them; this table only keeps the generations' states right."""

from __future__ import annotations

import signal

from . import handoff
from .generation import DRAINING, FAILED, SERVING, Generation
from .messages import KIND, ToDaemon, ToMaster, kind_of
from .probation import split_failures

_KEPT = 20  # exited generations are kept for status, the newest first to go


class Generations:
    def __init__(self, daemon):
        self.daemon = daemon
        self.all: list[Generation] = []
        self.next_id = 1

    def __iter__(self):
        return iter(list(self.all))

    def __len__(self) -> int:
        return len(self.all)

    def __getitem__(self, index) -> Generation:
        return self.all[index]

    def alive(self) -> list[Generation]:
        return [g for g in self.all if g.alive]

    @property
    def serving(self) -> Generation | None:
        return next((g for g in reversed(self.all) if g.state == SERVING), None)

    @property
    def starting(self) -> bool:
        return any(g.starting for g in self.all)

    # --- starting, serving, draining ---

    def start(self, extra_env: dict | None = None, target: int | None = None,
              settings: dict | None = None) -> Generation:
        """A new generation of `target` workers (default: the daemon's); without `extra_env`
        it gets the serving one's (upgrade --env). `settings` adds to the configured ones."""
        daemon = self.daemon
        generation = Generation(self.next_id, daemon.pid, now=daemon.clock())
        generation.extra_env = dict(daemon.generation_env if extra_env is None else extra_env)
        environment = {**generation.extra_env, **daemon.listeners.generation_env(),
                       **(daemon.handoff.env() if daemon.handoff else {})}
        settings = {**daemon.generation_settings(), **(settings or {})}
        daemon.env.spawn(generation, daemon.loop, daemon.cfg.python, settings, target or daemon.target, environment,
                         self.on_message)
        self.next_id += 1
        self.all.append(generation)
        daemon.metrics.count("generations", "started")
        daemon.log.info("generation_started", generation=generation.id, master=generation.pid)
        return generation

    def promote(self, generation: Generation) -> None:
        generation.serve(self.daemon.clock())
        self.daemon.served_by(generation)

    def drain(self, generation: Generation, sweep: bool, hard_after: float | None = None,
              timeout: float | None = None) -> None:
        """Tell a generation to finish in-flight requests and exit; SIGKILL it if it overstays."""
        if not generation.alive:
            return
        generation.state = DRAINING
        # Its idle keep-alive connections go to the serving generation if that one takes them.
        hand_on = (not sweep and self.serving not in (None, generation)
                   and handoff.takes_handoff(self.daemon.cfg.worker_class))
        generation.send({KIND: ToMaster.DRAIN, "sweep": sweep, "timeout": timeout, "handoff": hand_on})
        self.watch_overstay(generation, hard_after if hard_after is not None
                            else self.daemon.cfg.graceful_timeout + 5.0)

    def stop(self, generation: Generation, hard_after: float) -> None:
        generation.state = DRAINING
        generation.send({KIND: ToMaster.STOP})
        self.watch_overstay(generation, hard_after)

    def watch_overstay(self, generation: Generation, after: float) -> None:
        """SIGKILL `generation` if it (or a worker of it) is still there `after` seconds from now."""
        def overstayed() -> None:
            if generation.alive or generation.worker_pids:
                self.daemon.log.warning("generation_killed", generation=generation.id, detail="did not exit in time")
                self.daemon.env.kill(generation, signal.SIGKILL)
        self.daemon.loop.call_later(after, overstayed)

    def send_all(self, message: dict) -> None:
        for generation in self.alive():
            generation.send(message)

    def kill_all(self) -> None:
        for generation in self.all:
            self.daemon.env.kill(generation, signal.SIGKILL)
        self.kill_stragglers()

    def kill_stragglers(self, group: int | None = None) -> None:
        """SIGKILL what is left of exited masters: workers re-parented to us that ignored
        the SIGTERM of their master's death (hung or stopped ones). `group`: one exited
        master's process group; None: every child's group but the live masters' (at shutdown)."""
        daemon = self.daemon
        daemon.env.kill_stragglers(daemon.pid, {g.pid for g in self.alive()}, group, daemon.log)

    # --- what they say, and their end ---

    def on_message(self, generation: Generation, message) -> None:
        # Guarded one by one: an exception must not drop the messages after it in the same read.
        self.daemon.loop.guarded(self.handle_message, generation, message)

    def handle_message(self, generation: Generation, message) -> None:
        kind = kind_of(message)
        if kind == ToDaemon.METRICS:
            requests, failures = split_failures(message.get("requests") or {})
            generation.outcomes.record(requests, failures, message.get("exits"))  # probation's input
            self.daemon.metrics.add_requests(requests)
            for cause in message.get("exits") or ():
                self.daemon.metrics.count("worker_exits", str(cause))
            return
        if kind == ToDaemon.WORKERS:
            generation.snapshot = message
        elif kind == ToDaemon.READY:
            generation.mark_ready()
        if kind is not None:
            self.daemon.generation_said(generation, kind, message)

    def by_pid(self, pid: int) -> Generation | None:
        return next((g for g in self.all if g.pid == pid and g.alive), None)

    def exited(self, generation: Generation, how: str) -> None:
        daemon = self.daemon
        was, was_starting = generation.state, generation.starting
        generation.exited(how)
        if generation.state == FAILED:
            daemon.metrics.count("generations", "rolled_back" if generation.rolled_back else "failed")
        generation.close(daemon.loop)
        daemon.log.info("generation_exited", generation=generation.id, status=how, was=was, state=generation.state)
        # Orphaned workers (re-parented to us) get SIGTERM from the kernel; kill stragglers later.
        daemon.loop.call_later(daemon.cfg.graceful_timeout + 1.0, lambda: self.kill_stragglers(generation.pid))
        self.all = [g for g in self.all if g.alive or g is generation][-_KEPT:]
        daemon.generation_ended(generation, how, crashed=was == SERVING, was_starting=was_starting)

    # --- across a daemon re-exec ---

    def export_state(self, now: float) -> list[dict]:
        return [g.export_state(now) for g in self.alive()]

    def adopt(self, entries: list[dict], next_id: int) -> None:
        daemon = self.daemon
        now = daemon.clock()
        self.next_id = next_id
        for entry in entries:
            generation = Generation.from_state(entry, daemon.pid, now, daemon.loop, self.on_message)
            self.all.append(generation)
            if generation.state == DRAINING:
                self.watch_overstay(generation, daemon.cfg.graceful_timeout + 5.0)

