"""stop: quick stop (SIGQUIT semantics): workers exit now, in-flight requests
are cut, and the daemon exits 0."""

from ..operations import Stop


def run(daemon, args, responder):
    daemon.begin(Stop(daemon, responder, args))
