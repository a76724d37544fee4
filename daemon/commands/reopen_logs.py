"""reopen-logs: reopen log files in the daemon, masters and workers (for
logrotate). A file that cannot be reopened (its directory was removed) keeps
its old descriptor, and the reply fails naming it."""

from appdctl import protocol


def run(daemon, args, responder):
    errors = daemon.reopen_logs()
    if errors:
        responder.fail(protocol.FAILED, "; ".join(errors))
        return
    responder.done({"reopened": True})
