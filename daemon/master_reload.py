"""A reload inside one generation, as the master carries it out (`appdctl reload`).

The story: the daemon sends new settings. The master takes them, marks every
worker it has as outgoing and keeps them serving; manage_workers starts as many
new workers with the new settings, and stops the outgoing ones as the new ones
become ready (all at once, or one by one with max_surge), so there are never
fewer ready workers than the target. The reload is done when the target is
ready and every replaced worker has exited.

If a new worker fails to boot, the reload is undone: the previous settings
come back, the outgoing workers stay, the new ones are stopped.
"""

from __future__ import annotations

from .messages import KIND, ToDaemon


class MasterReload:
    def __init__(self, master, settings: dict):
        self.master = master
        self.previous = master.cfg
        self.replaced: set[int] = set()  # pids of the workers this reload replaces
        master.cfg = master.cfg.updated(settings)

    def start(self) -> None:
        master = self.master
        for handle in master.workers.values():
            if handle.replaceable():
                handle.replace(cause="reload")
                self.replaced.add(handle.pid)
        master.report.dirty = True
        master.log.info("reload_started", workers=master.target)
        master.gunicorn_hook("on_reload")

    def progress(self, ready: int) -> None:
        """Called as workers come and go: done once the target is ready and the old ones are gone."""
        if ready >= self.master.target and self.replaced.isdisjoint(self.master.workers):
            self.finish(ok=True)

    def abort(self, reason: str, output: str) -> None:
        """A new worker failed to boot: keep the old workers serving with the old settings."""
        master = self.master
        master.cfg = self.previous
        for handle in master.workers.values():
            if handle.outgoing():
                handle.keep()
            elif handle.replaceable():
                handle.stop(master.worker_cls.QUICK_SIGNAL, 2.0)
        self.finish(ok=False, reason=reason, output=output)

    def finish(self, ok: bool, reason: str = "", output: str = "") -> None:
        self.master.reload = None
        self.master.channel.send({KIND: ToDaemon.RELOADED, "ok": ok, "reason": reason, "output": output})
        self.master.log.info("reload_finished", ok=ok, reason=reason or None)
