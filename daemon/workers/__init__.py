"""Worker kinds. Each runs in a child of the master and reports to it with
systemd's notify protocol (READY=1, WATCHDOG=1, ...) over a datagram socket."""


def worker_class(name: str):
    if name == "sync":
        from .sync import SyncWorker
        return SyncWorker
    if name == "gthread":
        from .gthread import ThreadWorker
        return ThreadWorker
    if name == "asgi":
        from .asgi import AsgiWorker
        return AsgiWorker
    if name == "command":
        from .command import CommandWorker
        return CommandWorker
    raise ValueError(f"unknown worker_class {name!r}")
