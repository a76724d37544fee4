"""What the daemon does to the world outside its own loop, gathered in one
object in the style of tableflip's `env`: start a generation, signal a
process group, find stragglers, reap children, read the clock. The daemon
and its operations use nothing else for these, so unit tests
(tests/unit/) pass a fake and drive upgrade, rollback, reload, scale, drain
and crash recovery with fake generations that post messages, in milliseconds.
"""

from __future__ import annotations

import os
import signal
import time

from . import proc


class ProcessEnv:
    """The real one."""

    @staticmethod
    def clock() -> float:
        return time.monotonic()

    @staticmethod
    def spawn(generation, loop, python: str, settings: dict, target: int, environment: dict, on_message) -> None:
        """Start `generation`'s master (fork + exec) with the listeners and the handoff
        channel named in `environment`; sets its pid and channel."""
        generation.spawn(loop, python, settings, target, environment, on_message)

    @staticmethod
    def kill(generation, signum: int = signal.SIGKILL) -> None:
        """Signal the master's whole process group (it is a session leader)."""
        if generation.pid and generation.alive:
            try:
                os.killpg(generation.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass

    @staticmethod
    def reaped_children():
        return proc.reaped_children()

    @staticmethod
    def kill_stragglers(daemon_pid: int, keep: set[int], group: int | None, log) -> None:
        """SIGKILL the process groups of our children but `keep` (and ours): workers
        re-parented to us (we are their subreaper) that outlived their master.
        `group` limits it to one exited master's group; None means all (at shutdown)."""
        import psutil
        try:
            children = psutil.Process(daemon_pid).children()
        except psutil.Error:
            return
        groups = set()
        for child in children:
            try:
                groups.add(os.getpgid(child.pid))
            except OSError:
                pass
        groups -= {os.getpgrp(), *keep}
        for pgid in groups if group is None else groups & {group}:
            log.warning("stragglers_killed", group=pgid, detail="left by an exited master")
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass
