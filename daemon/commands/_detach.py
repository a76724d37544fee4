"""Shared by reload and upgrade: --no-wait replies once the operation started."""

from ..control import LogResponder


def begin(daemon, operation, wait: bool) -> None:
    if wait:
        daemon.begin(operation)
        return
    client = operation.responder
    operation.responder = LogResponder(daemon.log, source=operation.name)
    if daemon.operation is not None or daemon.state == "stopping":
        operation.responder = client  # refused: the client gets the busy reply
        daemon.begin(operation)
        return
    daemon.begin(operation)
    client.done({"outcome": "started", "op": operation.name})
