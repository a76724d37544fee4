"""scale +N | -N | N: change the target worker count, within 1..max_workers.
The daemon keeps the target, so it survives reload and upgrade. Replies when
the serving generation has exactly that many ready workers."""

from appdctl import protocol

from ..operations import Scale


def run(daemon, args, responder):
    if (args.get("delta") is None) == (args.get("count") is None):
        responder.fail(protocol.BAD_REQUEST, "scale: give exactly one of delta or count")
        return
    daemon.begin(Scale(daemon, responder, args))
