"""promote: end a held canary (`upgrade --canary N --hold`) or a running
probation or canary now, as if it had passed: the canary grows to the target
worker count (within max_surge) and the old generation drains. Works after a
daemon re-exec: a held canary is a generation in state canary."""

from ..canary import decide_by_hand


def run(daemon, args, responder):
    decide_by_hand(daemon, "promote", responder)
