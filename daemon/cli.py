"""`appd start [APP] [options]` and `appd check [APP] [options]`.

Every option is derived from config.SETTINGS: --some-name for some_name."""

from __future__ import annotations

import argparse
import subprocess
import sys

from . import __version__, config, gunicorn, gunicorn_sources, speedups

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _add_settings(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app_positional", nargs="?", metavar="APP",
                        help="WSGI app as module:attribute (default: the built-in demo app)")
    for setting in config.SETTINGS:
        names = [setting.flag] + ([setting.short] if setting.short else [])
        help_text = f"{setting.help} [{setting.env}]".replace("%", "%%")  # argparse formats help
        if setting.parse is config._bool:
            parser.add_argument(*names, dest=setting.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        elif setting.repeatable:
            parser.add_argument(*names, dest=setting.name, action="append", metavar=setting.metavar,
                                help=help_text)
        elif setting.parse is config._proxy_protocol:  # gunicorn's bare --proxy-protocol means auto
            parser.add_argument(*names, dest=setting.name, nargs="?", const="auto", metavar=setting.metavar,
                                help=help_text)
        else:
            parser.add_argument(*names, dest=setting.name, metavar=setting.metavar, help=help_text)
    gunicorn_sources.add_flags(parser)  # -k, --keep-alive, --access-logfile, --pid, ... (same settings)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appd", description="Zero-downtime upgrade daemon for web services.")
    parser.add_argument("--version", action="version",
                        version=f"appd {__version__} (http_impl: {speedups.http_impl()})")
    sub = parser.add_subparsers(dest="subcommand", required=True)  # not "command": a setting has that name
    start = sub.add_parser("start", help="run the daemon in the foreground")
    check = sub.add_parser("check", help="validate the config and import the app in a child process")
    for command in (start, check):
        _add_settings(command)
    migrate = sub.add_parser("migrate", help="print the appd.toml equivalent of a gunicorn.conf.py "
                             "and what it could not carry over")
    migrate.add_argument("file", metavar="GUNICORN_CONF_PY")
    return parser


def flags_from(namespace: argparse.Namespace) -> dict:
    """appd-named flags; gunicorn's spellings are translated (and refused) like its config file."""
    translation = gunicorn.translate(gunicorn_sources.flags_from(namespace), "command line")
    if translation.refused:
        raise config.ConfigError("gunicorn flags appd cannot honour:\n  " + "\n  ".join(translation.refused))
    flags = {s.name: getattr(namespace, s.name) for s in config.SETTINGS}
    if namespace.app_positional:
        flags["app"] = namespace.app_positional
    return {**translation.values, **{k: v for k, v in flags.items() if v is not None}}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.subcommand == "migrate":
        from .gunicorn_report import migrate
        return migrate(args.file)
    if getattr(args, "gunicorn.check_config", None):
        args.subcommand = "check"  # gunicorn --check-config
    if args.subcommand == "start":
        from . import reexec
        state = reexec.read_state()
        if state is not None:  # re-exec'd in place: the running config, never the file on disk
            return start(reexec.config_of(state)[0], state=state)
    try:
        flags = flags_from(args)
        cfg = config.load(flags)
    except config.ConfigError as exc:
        print(f"appd: invalid configuration: {exc}", file=sys.stderr)
        # check's verdict is 0 or 1 (the contract); start refuses like a usage error
        return EXIT_FAILED if args.subcommand == "check" else EXIT_USAGE
    for note in cfg.notes:
        print(f"appd: {note}", file=sys.stderr)
    if args.subcommand == "check":
        return check(cfg)
    return start(cfg, flags)


def check(cfg: config.Config) -> int:
    """Import the app (and run ready_check) in a child interpreter, as a worker would."""
    code = ("import sys, os\n"
            "os.chdir(sys.argv[1]); sys.path.insert(0, os.getcwd())\n"
            "from appd.app import load_app, ready_check\n"
            "app = load_app(sys.argv[2] or None)\n"
            "if sys.argv[3]:\n"
            "    ok, status = ready_check(app, sys.argv[3])\n"
            "    if not ok: sys.exit(f'ready_check GET {sys.argv[3]} answered {status!r}')\n")
    if cfg.worker_class == "asgi":  # load, lifespan and ready check as an asgi worker does
        code = ("import sys, os\n"
                "os.chdir(sys.argv[1]); sys.path.insert(0, os.getcwd())\n"
                "from appd.asgi.loading import check\n"
                f"check(sys.argv[2] or None, {bool(cfg.factory)}, sys.argv[3] or None)\n")
    try:
        result = subprocess.run([cfg.python, "-c", code, cfg.chdir, cfg.app or "", cfg.ready_check or ""],
                                capture_output=True, text=True, timeout=cfg.boot_timeout)
    except subprocess.TimeoutExpired:
        print(f"appd check: the app did not load within boot_timeout ({cfg.boot_timeout} s)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"appd check: cannot run {cfg.python}: {exc.strerror}", file=sys.stderr)
        return EXIT_FAILED
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        print(f"appd check: the app {cfg.app or 'appd.demo:app'} failed to load", file=sys.stderr)
        return EXIT_FAILED
    print(f"appd check: config ok, app {cfg.app or 'appd.demo:app'} loads"
          + (f", {cfg.ready_check} answers 2xx" if cfg.ready_check else ""))
    return EXIT_OK


def start(cfg: config.Config, flags: dict | None = None, state: dict | None = None) -> int:
    """Run the daemon: a fresh one from `cfg` and `flags`, or the one a previous
    image handed over in `state` (re-exec in place)."""
    from . import log
    from .control import ControlSocketError
    from .daemon import Daemon

    log.configure(cfg.log_format, cfg.log_level, cfg.error_log)
    try:
        daemon = Daemon.from_state(state) if state is not None else Daemon.fresh(cfg, flags)
        return daemon.serve()
    except (OSError, ControlSocketError) as exc:
        log.get(role="daemon").error("start_failed", error=str(exc))
        print(f"appd: {exc}", file=sys.stderr)
        return EXIT_FAILED

if __name__ == "__main__":
    sys.exit(main())
