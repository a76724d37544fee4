"""upgrade [--no-wait] [--env K=V ...]: start a new generation from a fresh
exec (new code, new interpreter: `python` and `chdir` are re-resolved now),
wait until every worker is ready (and passes ready_check), then drain the old
generation. If the new one exits, fails to boot or is not ready within
boot_timeout it is stopped, the old one keeps serving untouched, and the
reply is rolled_back with the reason and the new generation's last output.

--env names must be non-empty, without `=` or NUL; values without NUL. Names
LD_* and PYTHON* (which run code as the daemon's user) are refused for peers
other than root and the daemon's own uid. The environment given is kept by
crash recovery and by a reload that needs a new generation.

upgrade --daemon: re-exec the daemon itself in place (same PID, listeners,
control socket and generations); refused, with nothing changed, when the
new daemon code does not import or cannot parse its arguments and state.

upgrade --canary N [--hold]: the new generation starts with N workers serving
beside the old one and is watched for `probation` seconds: over the limits
(rollback_error_rate with rollback_min_requests, worker crashes) it is
drained and the reply is rolled_back with the evidence; healthy, it grows to
the target and the old one drains. Progress events carry the live counts.
--hold ends with the canary running (outcome held): `appdctl promote` or
`appdctl rollback`. With probation > 0 and no canary, the old generation
stands by after cutover and resumes if the new one fails its probation."""

import os

from appdctl import protocol

from ..canary import upgrade_operation
from ..operations import ReexecDaemon
from ._detach import begin

_PRIVILEGED_PREFIXES = ("LD_", "PYTHON")


def env_problem(env: dict, peer_uid: int | None) -> tuple[str, str] | None:
    """(error code, message) when `env` may not be used, else None."""
    for name, value in env.items():
        if not isinstance(name, str) or not isinstance(value, str):
            return protocol.BAD_REQUEST, "upgrade: env must map strings to strings"
        if not name or "=" in name or "\0" in name:
            return protocol.BAD_REQUEST, (f"upgrade: env name {protocol.short(name)} is invalid "
                                          "(it must be non-empty, without '=' or NUL)")
        if "\0" in value:
            return protocol.BAD_REQUEST, f"upgrade: env value of {protocol.short(name)} contains NUL"
        trusted = peer_uid is None or peer_uid in (0, os.getuid())
        if name.upper().startswith(_PRIVILEGED_PREFIXES) and not trusted:
            return protocol.PERMISSION_DENIED, (f"upgrade: env name {protocol.short(name)} is reserved "
                                                "to root and the daemon's own user (LD_* and PYTHON* "
                                                "run code as the daemon's user)")
    return None


def run(daemon, args, responder):
    env = args.get("env") or {}
    problem = env_problem(env, getattr(responder, "peer_uid", None))
    if problem:
        responder.fail(*problem)
        return
    if args.get("daemon"):
        daemon.begin(ReexecDaemon(daemon, responder, {}))
        return
    if args.get("canary") is not None and args["canary"] < 1:
        responder.fail(protocol.BAD_REQUEST, f"upgrade --canary {args['canary']}: at least 1 worker")
        return
    watched = {"canary": args.get("canary"), "hold": args.get("hold")}
    begin(daemon, upgrade_operation(daemon, responder, {"env": env, **watched}), args["wait"])
