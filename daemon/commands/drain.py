"""drain [--timeout S]: graceful stop. Workers stop taking new connections
after serving what waits in the accept backlog, finish in-flight requests
(bounded by the timeout, default graceful_timeout, then SIGKILL), and the
daemon exits 0. Progress is streamed."""

from ..operations import Shutdown


def run(daemon, args, responder):
    daemon.begin(Shutdown(daemon, responder, args))
