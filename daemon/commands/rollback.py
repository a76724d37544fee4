"""rollback: end a held canary or a running probation or canary now, as if it
had failed: a canary is drained (the old generation never stopped serving);
after cutover the old generation resumes accepting first, then the new one
drains. The result carries what was observed of the new generation."""

from ..canary import decide_by_hand


def run(daemon, args, responder):
    decide_by_hand(daemon, "rollback", responder)
