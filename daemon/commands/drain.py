"""drain [--timeout S]: graceful stop. Workers stop taking new connections
after serving what waits in the accept backlog, finish in-flight requests
(bounded by the timeout, default graceful_timeout, then SIGKILL), and the
daemon exits 0. Progress is streamed. The timeout must be a finite number of
seconds, not negative (a negative one would SIGKILL in-flight requests)."""

from appdctl import protocol

from ..config import seconds
from ..operations import Shutdown


def run(daemon, args, responder):
    if args.get("timeout") is not None:
        try:
            args = {**args, "timeout": seconds(args["timeout"])}
        except ValueError as exc:
            responder.fail(protocol.BAD_REQUEST, f"drain: invalid timeout: {exc}")
            return
    daemon.begin(Shutdown(daemon, responder, args))
