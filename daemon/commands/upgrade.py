"""upgrade [--no-wait] [--env K=V ...]: start a new generation from a fresh
exec (new code, new interpreter: `python` and `chdir` are re-resolved now),
wait until every worker is ready (and passes ready_check), then drain the old
generation. If the new one exits, fails to boot or is not ready within
boot_timeout it is stopped, the old one keeps serving untouched, and the
reply is rolled_back with the reason and the new generation's last output.

upgrade --daemon: re-exec the daemon itself in place (same PID, listeners,
control socket and generations); refused, with nothing changed, when the
new daemon code does not import."""

from appdctl import protocol

from ..operations import ReexecDaemon, Upgrade
from ._detach import begin


def run(daemon, args, responder):
    env = args.get("env") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        responder.fail(protocol.BAD_REQUEST, "upgrade: env must map strings to strings")
        return
    if args.get("daemon"):
        daemon.begin(ReexecDaemon(daemon, responder, {}))
        return
    begin(daemon, Upgrade(daemon, responder, {"env": env}), args["wait"])
