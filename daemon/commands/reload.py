"""reload [--no-wait]: re-read and validate the config file (an invalid file
changes nothing and the reply names the bad setting), apply listener changes,
then replace the workers without ever having fewer ready workers than the
target: new ones ready first, old ones drained after. With preload_app the
workers are re-forked from the master's code and the reply says to use
upgrade for new code. Waits for the outcome unless --no-wait."""

from ..reload import Reload
from ._detach import begin


def run(daemon, args, responder):
    begin(daemon, Reload(daemon, responder, args), args["wait"])
