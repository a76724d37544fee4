"""ping: answer at once with the daemon's pid and version (liveness)."""

from .. import __version__


def run(daemon, args, responder):
    responder.done({"pong": True, "pid": daemon.pid, "version": __version__})
