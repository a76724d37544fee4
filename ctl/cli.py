"""appdctl [--socket PATH] [--json] [--timeout S] COMMAND

Talks to appd over its control socket and exits with the real outcome:
0 success, 1 failed or rolled back, 2 usage error, 3 daemon not reachable,
4 refused (busy, permission). Imports nothing heavy: it must start fast.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import protocol
from .client import Client, CommandError

_QUICK_TIMEOUT = 10.0   # ping, status, reopen-logs
_LONG_TIMEOUT = 600.0   # operations that wait for workers to boot and drain


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 already; keep the contract's wording
        self.print_usage(sys.stderr)
        print(f"appdctl: error: {message}", file=sys.stderr)
        raise SystemExit(protocol.EXIT_USAGE)


def _scale_spec(text: str) -> dict:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not +N, -N or N") from None
    return {"delta": number} if text[:1] in "+-" else {"count": number}


def _seconds(text: str) -> float:
    """A duration: finite and not negative (a negative drain timeout would SIGKILL at once)."""
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number of seconds")
    if number < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return number


def _positive(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of workers") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: at least 1 worker")
    return number


def _env_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not K=V")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="appdctl", description="Control a running appd.")
    _add_client_options(parser)
    # The same options after the command too (`appdctl status --json`), without
    # overriding ones given before it; drain's own --timeout is its drain time.
    anywhere = _Parser(add_help=False)
    _add_client_options(anywhere, after_command=True)
    anywhere_but_timeout = _Parser(add_help=False)
    _add_client_options(anywhere_but_timeout, after_command=True, timeout=False)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str, parents=(anywhere,)) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=list(parents))

    command("status", "daemon, generations, workers, listeners, last operation")
    command("ping", "liveness")
    top = command("top", "live view: requests/s, busy, RSS, CPU per worker, backlog, running operation")
    top.add_argument("--interval", type=_seconds, default=2.0, metavar="S", help="seconds between views (default 2)")
    top.add_argument("--count", type=int, default=None, metavar="N", help="stop after N views (default: never)")
    reload = command("reload", "re-read the config and replace workers, new ones first")
    reload.add_argument("--no-wait", action="store_true", help="reply once started")
    upgrade = command("upgrade", "start a new generation with new code, then drain the old")
    upgrade.add_argument("--no-wait", action="store_true", help="reply once started")
    upgrade.add_argument("--env", action="append", type=_env_pair, default=[], metavar="K=V",
                         help="extra environment for the new generation (repeatable)")
    upgrade.add_argument("--daemon", action="store_true", help="re-exec the daemon itself in place")
    upgrade.add_argument("--canary", type=_positive, metavar="N",
                         help="start N new workers beside the old generation, watched for `probation` s")
    upgrade.add_argument("--hold", action="store_true",
                         help="end with the canary running; then `appdctl promote` or `appdctl rollback`")
    command("promote", "end a held canary or a probation now: the new generation takes over")
    command("rollback", "end a held canary or a probation now: back to the old generation")
    scale = command("scale", "change the target worker count: +N, -N or N")
    scale.add_argument("spec", type=_scale_spec, metavar="+N|-N|N")
    drain = command("drain", "graceful stop with progress", parents=(anywhere_but_timeout,))
    drain.add_argument("--timeout", dest="drain_timeout", type=_seconds, metavar="S",
                       help="time allowed for in-flight requests (default: graceful_timeout)")
    command("stop", "quick stop")
    command("reopen-logs", "reopen log files (logrotate)")
    retire = command("retire", "gracefully replace one worker")
    retire.add_argument("pid", type=int)
    return parser


def _add_client_options(parser: argparse.ArgumentParser, after_command: bool = False,
                        timeout: bool = True) -> None:
    # After the command, an option not given must leave no default behind.
    unset = {"default": argparse.SUPPRESS} if after_command else {}
    parser.add_argument("--socket", **unset,
                        help="control socket (default: $APPD_SOCKET, else appd's default path)")
    parser.add_argument("--json", action="store_true", **unset,
                        help="print the result as JSON (events as JSON lines)")
    if timeout:
        parser.add_argument("--timeout", type=_seconds, **unset, help="seconds to wait for the final reply")


def request_for(args: argparse.Namespace) -> tuple[str, dict]:
    command = args.command.replace("-", "_")
    if command in ("reload", "upgrade"):
        extra = {"env": dict(args.env), "daemon": args.daemon or None, "canary": args.canary,
                 "hold": args.hold or None} if command == "upgrade" else {}
        return command, {"wait": not args.no_wait, **extra}
    if command == "scale":
        return command, args.spec
    if command == "drain":
        return command, {"timeout": args.drain_timeout}
    if command == "retire":
        return command, {"pid": args.pid}
    return command, {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "top":
        return run_top(args)
    command, params = request_for(args)
    timeout = args.timeout or (_QUICK_TIMEOUT if command in ("ping", "status", "reopen_logs") else _LONG_TIMEOUT)
    out = _SurvivesClosedPipe(JsonOutput() if args.json else HumanOutput(command))
    try:
        with Client(args.socket, timeout=timeout) as client:
            result = client.call(command, on_event=out.event, **params)
    except CommandError as exc:
        out.error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        print("appdctl: interrupted; the operation goes on in the daemon (see appdctl status)", file=sys.stderr)
        return protocol.EXIT_FAILED
    out.result(result)
    return protocol.EXIT_OK


def run_top(args: argparse.Namespace) -> int:
    from . import top
    try:
        return top.run(args.socket, args.interval, args.count, args.timeout or _QUICK_TIMEOUT)
    except CommandError as exc:
        HumanOutput("top").error(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        return protocol.EXIT_OK


class _SurvivesClosedPipe:
    """When the reader goes away (`appdctl status --json | head -3`), drop the
    rest of the output but keep waiting: the exit code must still be the
    operation's real outcome, and leaving early would not stop it anyway."""

    def __init__(self, output):
        self.output = output

    def __getattr__(self, name):
        write = getattr(self.output, name)

        def guarded(*args):
            try:
                write(*args)
            except BrokenPipeError:
                devnull = os.open(os.devnull, os.O_WRONLY)
                for stream in (sys.stdout, sys.stderr):
                    os.dup2(devnull, stream.fileno())
                os.close(devnull)
        return guarded


class JsonOutput:
    def __init__(self):
        import json  # only here: appdctl must start fast
        self.json = json

    def event(self, message: dict) -> None:
        print(self.json.dumps(message), flush=True)

    def result(self, result: dict) -> None:
        print(self.json.dumps(result, indent=2))

    def error(self, exc: CommandError) -> None:
        print(self.json.dumps({"ok": False, "error": {**exc.detail, "code": exc.code, "message": exc.message}},
                         indent=2))


class HumanOutput:
    def __init__(self, command: str):
        self.command = command
        self.live = sys.stderr.isatty()
        self.last_len = 0

    def event(self, message: dict) -> None:
        fields = " ".join(f"{k}={v}" for k, v in message.items() if k not in ("id", "event"))
        line = f"{self.command}: {message['event']} {fields}".rstrip()
        if self.live:  # one line, rewritten in place
            sys.stderr.write("\r" + line.ljust(self.last_len))
            self.last_len = len(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def _end_live(self) -> None:
        if self.live and self.last_len:
            sys.stderr.write("\n")

    def result(self, result: dict) -> None:
        self._end_live()
        if self.command == "status":
            print(format_status(result))
        elif self.command == "ping":
            print(f"pong from appd {result.get('version')} (pid {result.get('pid')})")
        else:
            details = " ".join(f"{k}={v}" for k, v in result.items() if k not in ("outcome", "notes", "observed", "evidence", "output"))
            print(f"{self.command}: {result.get('outcome', 'done')} {details}".rstrip())
            for note in result.get("notes") or []:
                print(f"  note: {note}")
            print_evidence(result.get("observed") or result.get("evidence"))

    def error(self, exc: CommandError) -> None:
        self._end_live()
        print(f"appdctl {self.command}: {exc.code}: {exc.message}", file=sys.stderr)
        print_evidence(exc.detail.get("evidence"), sys.stderr)
        output = exc.detail.get("output")
        if output:
            print("--- last output of the new generation ---", file=sys.stderr)
            print(output.rstrip(), file=sys.stderr)


def outcome_line(counts: dict) -> str:
    if counts.get("errors") is None:
        errors = "5xx not counted"
    else:
        errors = f"{counts['errors']} 5xx (ratio {counts.get('error_rate') or 0.0:.3f})"
    return (f"{counts.get('requests', 0)} requests, {errors}, {counts.get('crashes', 0)} crashes, "
            f"{counts.get('timeouts', 0)} timeouts")


def print_evidence(evidence: dict | None, stream=None) -> None:
    """What probation observed of the new generation: counts, failing paths and statuses."""
    if not evidence:
        return
    stream = stream or sys.stdout
    print(f"  observed: {outcome_line(evidence)}", file=stream)
    for label, key in (("failing paths", "failing_paths"), ("failing statuses", "failing_statuses")):
        if evidence.get(key):
            print(f"  {label}: " + ", ".join(f"{name} x{count}" for name, count in evidence[key]), file=stream)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _size(nbytes: int) -> str:
    return f"{nbytes / 1048576:.1f}M"


def _backlog(listener: dict) -> str:
    if listener.get("queued") is None:
        return ""
    return f"  queued {listener['queued']}/{listener['max_queued']}"


def _busy(worker: dict) -> str:
    """busy count and the current request's age, e.g. "1 (3.2s)"; "-" when not reported."""
    if worker.get("busy") is None:
        return "-"
    return f"{worker['busy']} ({worker['request_age_s']:.1f}s)" if worker["busy"] else "0"


def format_status(status: dict) -> str:
    daemon = status["daemon"]
    state = daemon.get("state", "")
    if daemon.get("drain_delay_left_s") is not None:
        state = f"draining, delay ({daemon['drain_delay_left_s']:.1f} s left)"
    lines = [f"appd {daemon['version']}  pid {daemon['pid']}  {state}  "
             f"up {_age(daemon['uptime_s'])}  rss {_size(daemon.get('rss_bytes', 0))}  socket {daemon['socket']}"]
    for listener in status["listeners"]:
        lines.append(f"listener {listener['name']}: {listener['address']} (fd {listener['fd']}){_backlog(listener)}")
    if daemon.get("metrics_address"):
        lines.append(f"metrics: http://{daemon['metrics_address']}/metrics  /livez  /readyz")
    lines.append(f"target workers: {status['target_workers']}")
    rows = [("GEN", "STATE", "MASTER", "WORKER", "WSTATE", "AGE", "REQS", "BUSY", "RSS", "CPU")]
    for gen in status["generations"]:
        head = (str(gen["id"]), gen["state"], str(gen["master_pid"]))
        if not gen["workers"]:
            rows.append(head + ("-",) * 7)
        for worker in gen["workers"]:
            rows.append(head + (str(worker["pid"]), worker["state"], _age(worker["age"]),
                                str(worker["requests"]), _busy(worker), _size(worker["rss_bytes"]),
                                f"{worker['cpu_percent']:.0f}%"))
            head = ("", "", "")
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip() for row in rows]
    last = status.get("last_operation")
    if last:
        verdict = "ok" if last["ok"] else f"{last['outcome']}: {last['error']}"
        lines.append(f"last operation: {last['op']} {verdict} ({last['duration_s']} s)")
    if status.get("operation"):
        lines.append(f"running: {status['operation']}")
    for gen in status["generations"]:
        for replaced in gen.get("replaced") or []:
            lines.append(f"replaced: generation {gen['id']} worker {replaced['pid']}: {replaced['reason']}")
    watched = any(gen["state"] in ("canary", "standby") for gen in status["generations"])
    for gen in status["generations"]:
        if watched or gen.get("errors") is not None:  # beside a canary: both generations' counts
            lines.append(f"generation {gen['id']} ({gen['state']}): {outcome_line(gen)}")
    for crash in status.get("crashes") or []:
        lines.append(f"crash: generation {crash['generation']} {crash['status']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
