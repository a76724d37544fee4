"""The daemon's pidfile: written atomically without following a symlink
planted at the temporary name, removed only while it still names us."""

from __future__ import annotations

import os


def write(path: str, pid: int) -> None:
    """Raises OSError naming the file when it cannot be written."""
    tmp = f"{path}.{pid}.tmp"
    try:  # unlink does not follow a symlink; O_EXCL|O_NOFOLLOW refuses one planted again
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w") as f:
        f.write(f"{pid}\n")
    os.replace(tmp, path)


def remove(path: str, pid: int) -> None:
    try:
        with open(path) as f:
            if f.read().strip() == str(pid):
                os.unlink(path)
    except OSError:
        pass


class Pidfile:
    """The `pidfile` setting: written at start (a fresh start that cannot write it
    refuses to run; a re-exec'd daemon already serves and only logs), removed at exit."""

    def __init__(self, path: str | None, pid: int, log):
        self.path, self.pid, self.log = path, pid, log

    def write(self, strict: bool) -> None:
        if not self.path:
            return
        try:
            write(self.path, self.pid)
        except OSError as exc:
            if strict:
                raise
            self.log.error("pidfile_not_written", pidfile=self.path, error=str(exc))

    def remove(self) -> None:
        if self.path:
            remove(self.path, self.pid)
