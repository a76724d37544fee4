"""status: the daemon, its generations and their workers (pid, state, age,
requests, RSS, CPU), the listeners, the target worker count and the last
operation. Answers at any time, also in the middle of an upgrade."""


def run(daemon, args, responder):
    responder.done(daemon.status())
