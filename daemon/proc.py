"""Small process-level helpers: Linux prctl flags and process titles."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36

try:
    _libc = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - not Linux
    _libc = None


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` when our parent exits (no orphans if it is SIGKILLed)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)


def become_subreaper() -> None:
    """Orphaned descendants are re-parented to us instead of PID 1, so we can reap them."""
    if _libc is not None:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def set_title(title: str, proc_name: str | None = None) -> None:
    """`appd: worker gen 3`, with `[proc_name]` after it when one is set (gunicorn's style)."""
    try:
        import setproctitle
    except ImportError:  # pragma: no cover
        return
    setproctitle.setproctitle(f"{title} [{proc_name}]" if proc_name else title)


def reaped_children():
    """Yield (pid, wait status) for every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def describe_exit(status: int) -> str:
    """A wait status as words: 'exit code 3' or 'killed by SIGKILL'."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"killed by {name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
