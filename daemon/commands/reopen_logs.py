"""reopen-logs: reopen log files in the daemon, masters and workers (for logrotate)."""


def run(daemon, args, responder):
    daemon.reopen_logs()
    responder.done({"reopened": True})
