"""retire PID: gracefully replace one worker. A replacement is started first;
once it is ready the old worker finishes its request and exits."""

from ..operations import Retire


def run(daemon, args, responder):
    daemon.begin(Retire(daemon, responder, args))
