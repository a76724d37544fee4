"""Settings, declared once. Every other form (TOML key, APPD_* variable, --flag,
help text, validation) is derived from the SETTINGS table below.

Precedence: defaults < TOML file (--config) < APPD_* environment < flags.
"""

from __future__ import annotations

import math
import os
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from appdctl.protocol import default_socket_path


class ConfigError(Exception):
    """An invalid setting; the message names the setting, the bad value and where it came from."""


# --- value parsers: each takes a TOML value or a string and returns the typed value ---

_INT_MAX = 2 ** 31 - 1      # every integer setting ends up in a C int somewhere (listen, setrlimit)
_SECONDS_MAX = 10.0 ** 9    # ~31 years: beyond this a timeout overflows C timevals


def _int(minimum: int | None = None, maximum: int | None = _INT_MAX) -> Callable:
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(value)
        except ValueError:  # also Python's limit on digits in a string
            raise ValueError(f"{_short(value)} is not an integer") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"{number} is below the minimum {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"{number} is above the maximum {maximum}")
        return number
    parse.__name__ = "integer"
    return parse


def _short(value) -> str:
    from appdctl.protocol import short
    return short(value)


def seconds(value):
    """A duration: finite, not negative, not absurd. Shared with control arguments (drain --timeout)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"{_short(value)} is not a number of seconds") from None
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{_short(value)} is not a finite number of seconds")
    if number < 0:
        raise ValueError(f"{number} is negative")
    if number > _SECONDS_MAX:
        raise ValueError(f"{_short(value)} is above the maximum {_SECONDS_MAX:.0f} seconds")
    return number


_seconds = seconds


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{_short(value)} is not a boolean (use true or false)")


def _str(value):
    if not isinstance(value, str):
        raise ValueError(f"{_short(value)} is not a string")
    if "\0" in value:
        raise ValueError(f"{_short(value)} contains a NUL character")
    return value


_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}


def _size(value):
    """Bytes, as an integer or with a K/M/G suffix (powers of 1024): 0 means no limit."""
    text = str(value).strip().upper() if isinstance(value, (int, str)) and not isinstance(value, bool) else None
    unit = text[-1:] if text and text[-1:] in _SIZE_UNITS else ""
    try:
        number = int(text[:len(text) - len(unit)]) if text else None
    except ValueError:
        number = None
    if number is None or number < 0:
        raise ValueError(f"{_short(value)} is not a size in bytes (e.g. 512M, 1G, 1048576)")
    return number * _SIZE_UNITS[unit]


def _optional_str(value):
    if value is None or value == "":
        return None
    return _str(value)


def _choice(*choices: str) -> Callable:
    def parse(value):
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"{_short(value)} is not one of {', '.join(choices)}")
        return value
    return parse


def _str_list(value):
    """A list from TOML, or a comma-separated string from the environment."""
    if isinstance(value, str):
        return [_str(part.strip()) for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [_str(v) for v in value]
    raise ValueError(f"{_short(value)} is not a list of strings")


def _argv(value):
    """A command line: a TOML list, or a shell-quoted string."""
    if isinstance(value, str):
        import shlex
        return shlex.split(value)
    return _str_list(value)


def _int_list(value):
    try:
        return [int(v) for v in _str_list(value)] if isinstance(value, str) else [
            _int()(v) for v in value]
    except (TypeError, ValueError):
        raise ValueError(f"{_short(value)} is not a list of integers") from None


def _mode(value):
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            number = int(str(value), 8)
        except ValueError:
            raise ValueError(f"{_short(value)} is not an octal file mode such as 0600") from None
    if not 0 <= number <= 0o777:
        raise ValueError(f"{_short(value)} is not a file mode between 0000 and 0777")
    return number


def _hook(value):
    value = _optional_str(value)
    if value is not None and ":" not in value:
        raise ValueError(f"{_short(value)} is not of the form module:function")
    return value


def _str_map(value):
    """A TOML table of strings, or `NAME=VALUE,NAME=VALUE` from a flag or the environment."""
    if isinstance(value, str):
        pairs = [part.split("=", 1) for part in value.split(",") if part.strip()]
        if any(len(pair) != 2 for pair in pairs):
            raise ValueError(f"{value!r} is not a list of NAME=VALUE pairs")
        value = {name.strip(): text.strip() for name, text in pairs}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise ValueError(f"{value!r} is not a table of strings")
    return {str(k): v for k, v in value.items()}


def _json_table(value):
    """A TOML table, or the same as JSON text from a flag or the environment."""
    if isinstance(value, str):
        import json
        try:
            value = json.loads(value) if value.strip() else {}
        except ValueError as exc:
            raise ValueError(f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{value!r} is not a table")
    return value


def _env_list(value):
    """NAME=VALUE strings (gunicorn's raw_env)."""
    pairs = _str_list(value) if isinstance(value, str) else _str_list(list(value))
    for pair in pairs:
        if "=" not in pair or not pair.split("=", 1)[0]:
            raise ValueError(f"{pair!r} is not of the form NAME=VALUE")
    return pairs


def _umask(value):
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = int(value, 0) if value.lower().startswith("0o") else int(value, 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal umask such as 0o022") from None
    return _mode(value)


def _cert_reqs(value):
    names = {"none": 0, "optional": 1, "required": 2}
    if isinstance(value, str) and value.lower() in names:
        return names[value.lower()]
    return _int(0, 2)(value)


def _proxy_protocol(value):
    """off, v1, v2 or auto; gunicorn's older true/false mean auto/off."""
    if isinstance(value, bool) or (isinstance(value, str) and value.lower() in ("true", "false")):
        return "auto" if _bool(value) else "off"
    return _choice("off", "v1", "v2", "auto")(value)


def _optional_host_port(value):
    """HOST:PORT or [V6]:PORT, or None (off)."""
    if value in (None, ""):
        return None
    host, sep, port = str(value).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return str(value)


def _bind(value):
    from .listeners import parse_address
    addresses = _str_list(value)
    if not addresses:
        raise ValueError("at least one address is needed")
    for address in addresses:
        parse_address(address)  # raises ValueError naming the address
    return addresses


@dataclass(frozen=True)
class Setting:
    name: str
    parse: Callable[[Any], Any]
    default: Any
    help: str
    short: str | None = None
    metavar: str = "VALUE"
    # Settings that only take effect when a new generation starts (upgrade).
    needs_upgrade: bool = False
    # A flag that may be given several times, each adding to the list.
    repeatable: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "APPD_" + self.name.upper()


def _ratio(value):
    from .probation import parse_ratio
    return parse_ratio(value)


def _default_log_format() -> str:
    return "console" if sys.stderr.isatty() else "json"


SETTINGS: list[Setting] = [
    Setting("config", _optional_str, None, "TOML file of settings", short="-c", metavar="FILE"),
    Setting("app", _optional_str, None, "WSGI app as module:attribute (default: the built-in demo app)",
            metavar="MODULE:APP"),
    Setting("bind", _bind, ["127.0.0.1:8000"], "addresses to listen on: HOST:PORT, [V6]:PORT, "
            "unix:PATH or fd://N (repeatable)", short="-b", metavar="ADDRESS", repeatable=True),
    Setting("workers", _int(1), 2, "number of worker processes", short="-w", metavar="N"),
    Setting("max_workers", _int(1), 64, "upper bound for `appdctl scale`", metavar="N"),
    Setting("max_surge", _int(0), 0, "most workers beyond the target an upgrade runs at once: the new "
            "generation grows by this many as the old one shrinks by as many (0: the whole target "
            "at once)", metavar="N"),
    Setting("worker_class", _choice("sync", "gthread", "asgi", "command"), "sync",
            "sync (one request at a time), gthread (thread pool, keep-alive), asgi (asyncio, ASGI 3 "
            "apps, WebSockets) or command (any program)", metavar="CLASS"),
    Setting("factory", _bool, False, "APP names a function that returns the app (asgi): "
            "module:create_app", metavar="BOOL"),
    Setting("threads", _int(1), 1, "threads per worker (gthread)", metavar="N"),
    Setting("worker_connections", _int(1), 1000, "most connections a gthread or asgi worker holds "
            "at once (busy, waiting for a thread, or idle keep-alive)", metavar="N"),
    Setting("websocket_drain_timeout", _seconds, 0.0, "seconds open WebSockets of a stopping asgi "
            "worker keep working before they are closed with code 1012 (0: at once)", metavar="S"),
    Setting("command", _argv, [], "program each worker runs (worker_class = command); it gets the "
            "listeners as LISTEN_FDS", metavar="ARGV"),
    Setting("ready_delay", _seconds, 1.0, "seconds after which a command worker that never sends "
            "READY=1 counts as ready", metavar="S"),
    Setting("timeout", _seconds, 30.0, "a ready worker silent this long is killed (SIGABRT, then SIGKILL)",
            short="-t", metavar="S"),
    Setting("graceful_timeout", _seconds, 30.0, "time allowed to finish in-flight requests when "
            "stopping, before SIGKILL", metavar="S"),
    Setting("drain_delay", _seconds, 0.0, "on drain (SIGTERM, appdctl drain, systemd stop), seconds "
            "the service reports not ready (/readyz 503, status 'draining, delay') while it keeps "
            "serving, so load balancers stop routing to it first; a second SIGTERM or appdctl stop "
            "cuts it short", metavar="S"),
    # --- probation and canary upgrades (issue 21) ---
    Setting("probation", _seconds, 0.0, "seconds a new generation is watched on real traffic after "
            "cutover (the old one stands by, ready to resume) or as a canary; 0: drain the old one "
            "at once", metavar="S"),
    Setting("canary_workers", _int(0), 0, "every upgrade first runs this many new workers beside the "
            "old generation for `probation` seconds (as `appdctl upgrade --canary N`; 0: no canary)",
            metavar="N"),
    Setting("rollback_error_rate", _ratio, 0.05, "during probation, a 5xx ratio above this (over at "
            "least rollback_min_requests requests) rolls the upgrade back", metavar="RATIO"),
    Setting("rollback_min_requests", _int(1), 20, "requests the new generation must have answered "
            "before its 5xx ratio can roll it back", metavar="N"),
    Setting("boot_timeout", _seconds, 60.0, "time a new generation or worker has to become ready",
            metavar="S"),
    Setting("ready_check", _optional_str, None, "path each worker GETs in-process (2xx wanted) before "
            "it counts as ready, e.g. /healthz", metavar="PATH"),
    Setting("max_requests", _int(0), 0, "restart a worker after this many requests (0: never)", metavar="N"),
    Setting("max_requests_jitter", _int(0), 0, "random extra requests added to max_requests per worker",
            metavar="N"),
    Setting("max_worker_memory", _size, 0, "a worker whose RSS exceeds this (bytes, or with K/M/G) is "
            "replaced: its successor is started first, then it finishes its requests and exits "
            "(0: no limit)", metavar="SIZE"),
    Setting("max_worker_lifetime", _seconds, 0.0, "replace a worker after this many seconds, plus up "
            "to 10 percent random jitter, successor first (0: never)", metavar="S"),
    Setting("preload_app", _bool, False, "import the app in the master before forking workers",
            metavar="BOOL"),
    Setting("backlog", _int(1), 2048, "listen queue length", metavar="N"),
    Setting("unix_socket_mode", _mode, 0o666, "file mode of unix:PATH listeners", metavar="MODE"),
    Setting("keepalive", _seconds, 2.0, "seconds an idle keep-alive connection is kept (gthread)",
            metavar="S"),
    Setting("header_timeout", _seconds, 10.0, "deadline for a whole request head, from its first "
            "byte (or from accept) to its blank line; answered 408 (0: none)", metavar="S"),
    Setting("limit_request_line", _int(0), 4094, "longest request line in bytes, CRLF not counted; "
            "answered 414 (0: no limit)", metavar="N"),
    Setting("limit_request_fields", _int(0), 100, "most header (and trailer) fields per request; "
            "answered 431 (0: no limit)", metavar="N"),
    Setting("limit_request_field_size", _int(0), 8190, "longest field in bytes, counted as "
            "'Name: value' plus CRLF; answered 431 (0: no limit)", metavar="N"),
    Setting("control_socket", _str, None, "control socket path (default: $XDG_RUNTIME_DIR/appd.sock, "
            "/run/appd/appd.sock for root, else /tmp/appd-UID/appd.sock)", metavar="PATH"),
    Setting("control_socket_mode", _mode, 0o600, "control socket file mode", metavar="MODE"),
    Setting("control_socket_group", _optional_str, None, "group owning the control socket", metavar="GROUP"),
    Setting("control_allow_uids", _int_list, [], "further uids allowed on the control socket", metavar="UIDS"),
    Setting("control_allow_gids", _int_list, [], "further gids allowed on the control socket", metavar="GIDS"),
    Setting("metrics_bind", _optional_host_port, None, "HOST:PORT where the daemon serves /metrics "
            "(Prometheus), /livez and /readyz (default: off)", metavar="ADDRESS"),
    Setting("statsd_host", _optional_host_port, None, "HOST:PORT of a StatsD server the daemon sends "
            "the same figures to over UDP (default: off)", metavar="ADDRESS"),
    Setting("statsd_prefix", _str, "appd", "prefix of every StatsD metric name", metavar="PREFIX"),
    Setting("python", _str, sys.executable, "interpreter for new generations (re-resolved at each upgrade)",
            metavar="PATH", needs_upgrade=True),
    Setting("chdir", _str, None, "directory new generations run in and import the app from "
            "(re-resolved at each upgrade; default: where appd started)", metavar="DIR", needs_upgrade=True),
    Setting("pidfile", _optional_str, None, "file the daemon's pid is written to", metavar="FILE"),
    Setting("log_format", _choice("console", "json"), None, "console or json (default: console on a "
            "terminal, else json)", metavar="FORMAT"),
    Setting("log_level", _choice("debug", "info", "warning", "error"), "info", "lowest level logged",
            metavar="LEVEL"),
    Setting("access_log", _optional_str, None, "access log file, '-' for stderr (default: none)",
            metavar="FILE"),
    Setting("error_log", _str, "-", "log file, '-' for stderr", metavar="FILE"),
    Setting("post_fork", _hook, None, "called in each worker after fork: f(worker), or gunicorn's "
            "f(server, worker)", metavar="MOD:FUNC"),
    Setting("worker_exit", _hook, None, "called in each worker as it exits: f(worker), or gunicorn's "
            "f(server, worker)", metavar="MOD:FUNC"),
    Setting("on_ready", _hook, None, "called in the master when its generation is ready: f(master)",
            metavar="MOD:FUNC"),
    # Proxies: what a trusted peer may say about the client (gunicorn's names and defaults).
    Setting("forwarded_allow_ips", _str_list, ["127.0.0.1", "::1"], "peers (addresses, CIDR "
            "networks or *) whose X-Forwarded-* and forwarder headers are believed", metavar="IPS"),
    Setting("secure_scheme_headers", _str_map, {"X-FORWARDED-PROTOCOL": "ssl", "X-FORWARDED-PROTO": "https",
            "X-FORWARDED-SSL": "on"}, "headers (NAME=VALUE) by which a trusted proxy says the client used "
            "https", metavar="H=V,..."),
    Setting("forwarder_headers", _str_list, ["SCRIPT_NAME", "PATH_INFO"], "environ variables a trusted "
            "proxy may set by sending a header of the same name", metavar="NAMES"),
    Setting("proxy_protocol", _proxy_protocol, "off", "expect a PROXY protocol header (off, v1, v2 or "
            "auto) from proxy_allow_ips peers", metavar="MODE"),
    Setting("proxy_allow_ips", _str_list, ["127.0.0.1", "::1"], "peers allowed to send a PROXY "
            "protocol header", metavar="IPS"),
    # Process: who and where the generations run.
    Setting("user", _optional_str, None, "user (name or uid) generations and workers run as; the daemon "
            "keeps its own (e.g. root, holding the listeners)", short="-u", metavar="USER",
            needs_upgrade=True),
    Setting("group", _optional_str, None, "group (name or gid) generations and workers run as",
            short="-g", metavar="GROUP", needs_upgrade=True),
    Setting("umask", _umask, None, "umask of generations and workers, e.g. 0o027 (default: inherited)",
            metavar="MASK", needs_upgrade=True),
    Setting("initgroups", _bool, False, "also take the user's supplementary groups", metavar="BOOL",
            needs_upgrade=True),
    Setting("raw_env", _env_list, [], "NAME=VALUE set in the environment of generations (repeatable)",
            short="-e", metavar="NAME=VALUE", needs_upgrade=True, repeatable=True),
    Setting("pythonpath", _optional_str, None, "comma-separated directories put first on sys.path",
            metavar="DIRS", needs_upgrade=True),
    Setting("proc_name", _optional_str, None, "name shown in process titles", short="-n", metavar="NAME",
            needs_upgrade=True),
    # Logging, gunicorn style.
    Setting("access_log_format", _optional_str, None, "access log line with gunicorn's atoms, e.g. "
            "'%(h)s \"%(r)s\" %(s)s %(b)s %(D)s' (JSON mode: the same atoms as keys)", metavar="FORMAT"),
    Setting("capture_output", _bool, False, "send the app's stdout and stderr to error_log",
            metavar="BOOL", needs_upgrade=True),
    Setting("logconfig_dict", _json_table, {}, "logging.config.dictConfig() applied in generations "
            "(the app's stdlib logging)", metavar="JSON", needs_upgrade=True),
    # TLS on every TCP listener: the daemon holds plain sockets, workers wrap them.
    Setting("certfile", _optional_str, None, "TLS certificate (PEM); re-read by reload", metavar="FILE"),
    Setting("keyfile", _optional_str, None, "TLS private key (PEM)", metavar="FILE"),
    Setting("ca_certs", _optional_str, None, "CA certificates for client certificates", metavar="FILE"),
    Setting("cert_reqs", _cert_reqs, 0, "client certificate: 0 none, 1 optional, 2 required",
            metavar="N"),
    Setting("ciphers", _optional_str, None, "OpenSSL cipher list (default: Python's)", metavar="CIPHERS"),
    # gunicorn's hooks, with gunicorn's signatures (see daemon/hooks.py).
    Setting("on_starting", _hook, None, "master, first thing: f(server)", metavar="MOD:FUNC"),
    Setting("when_ready", _hook, None, "master, before it spawns its workers: f(server)",
            metavar="MOD:FUNC"),
    Setting("on_reload", _hook, None, "master, when a reload replaces its workers: f(server)",
            metavar="MOD:FUNC"),
    Setting("pre_fork", _hook, None, "master, before each fork: f(server, worker)", metavar="MOD:FUNC"),
    Setting("post_worker_init", _hook, None, "worker, after the app is loaded: f(worker)",
            metavar="MOD:FUNC"),
    Setting("pre_request", _hook, None, "worker, before each request: f(worker, req)", metavar="MOD:FUNC"),
    Setting("post_request", _hook, None, "worker, after each request: f(worker, req, environ, resp)",
            metavar="MOD:FUNC"),
    Setting("child_exit", _hook, None, "master, after a worker exited: f(server, worker)",
            metavar="MOD:FUNC"),
    Setting("worker_int", _hook, None, "worker, on SIGINT or SIGQUIT: f(worker)", metavar="MOD:FUNC"),
    Setting("worker_abort", _hook, None, "worker, on SIGABRT (timeout): f(worker)", metavar="MOD:FUNC"),
    Setting("nworkers_changed", _hook, None, "master, when its target changes: f(server, new, old)",
            metavar="MOD:FUNC"),
    Setting("pre_exec", _hook, None, "new master of an upgrade, before anything else: f(server)",
            metavar="MOD:FUNC"),
    Setting("on_exit", _hook, None, "master, as it exits: f(server)", metavar="MOD:FUNC"),
]
BY_NAME = {s.name: s for s in SETTINGS}
# Options of `appd start` that name the file itself are not read from the file.
_NOT_IN_FILE = {"config"}


@dataclass
class Config:
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # setting name -> where its value came from
    notes: list = field(default_factory=list)  # lines to show at start (gunicorn settings not needed)

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _apply(values: dict, sources: dict, name: str, raw, source: str) -> None:
    setting = BY_NAME[name]
    try:
        values[name] = setting.parse(raw)
    except (ValueError, TypeError, OverflowError, RecursionError) as exc:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"invalid {name}{where}: {exc}") from None
    sources[name] = source


def read_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:  # e.g. a comment saved as Latin-1: TOML is UTF-8
        raise ConfigError(f"config file {path} is not UTF-8 (TOML must be): byte "
                          f"0x{exc.object[exc.start]:02x} at offset {exc.start}") from None
    except (ValueError, RecursionError, MemoryError) as exc:  # e.g. nesting too deep, a huge number
        raise ConfigError(f"config file {path} cannot be read: {type(exc).__name__}: "
                          f"{str(exc)[:200]}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    # Accept both a flat file and one with an [appd] table.
    if isinstance(data.get("appd"), dict):
        data = data["appd"]
    return data


def load(flags: dict | None = None, environ=os.environ) -> Config:
    """Build the effective config. `flags` maps setting names to values given on the command line.
    gunicorn's layers (WEB_CONCURRENCY, gunicorn.conf.py, GUNICORN_CMD_ARGS) sit in between:
    see daemon/gunicorn.py for the order."""
    from . import gunicorn, gunicorn_sources
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    notes: list[str] = []
    for variable, name in gunicorn.ENV_DEFAULTS.items():  # WEB_CONCURRENCY: below every file
        if environ.get(variable):
            _apply(values, sources, name, environ[variable], variable)
    config_path = (flags.get("config") or environ.get(BY_NAME["config"].env)
                   or gunicorn_sources.cmd_args_config(environ) or gunicorn_sources.found_config())
    if config_path:
        _apply(values, sources, "config", config_path, _config_source(flags, environ))
        if gunicorn_sources.is_python_config(config_path):
            _apply_translation(values, sources, notes, gunicorn_sources.settings_from_python(config_path))
        else:
            for name, raw in read_file(config_path).items():
                if name not in BY_NAME or name in _NOT_IN_FILE:
                    raise ConfigError(f"unknown setting {_short(name)} in {config_path}")
                _apply(values, sources, name, raw, config_path)
    _apply_translation(values, sources, notes, gunicorn_sources.cmd_args(environ))
    for setting in SETTINGS:
        if setting.env in environ and setting.name != "config":
            _apply(values, sources, setting.name, environ[setting.env], setting.env)
    for name, raw in flags.items():
        if name != "config":
            _apply(values, sources, name, raw, BY_NAME[name].flag)
    _finish(values)
    _gthread_when_threaded(values, sources, notes)
    return Config(values, sources, notes)


def _config_source(flags: dict, environ) -> str:
    if "config" in flags:
        return "command line"
    if BY_NAME["config"].env in environ:
        return "environment"
    return "GUNICORN_CMD_ARGS" if "GUNICORN_CMD_ARGS" in environ else "found in the current directory"


def _apply_translation(values: dict, sources: dict, notes: list, translation) -> None:
    """Apply settings read in gunicorn's forms; every one appd cannot honour is refused, one line each."""
    if translation is None:
        return
    if translation.refused:
        raise ConfigError("gunicorn settings appd cannot honour:\n  " + "\n  ".join(translation.refused))
    notes.extend(f"not needed under appd: {line}" for line in translation.notes)
    for name, raw in translation.values.items():
        if name not in BY_NAME or name in _NOT_IN_FILE:
            raise ConfigError(f"unknown setting {name!r} in {translation.sources[name]}")
        _apply(values, sources, name, raw, translation.sources[name])


def _gthread_when_threaded(values: dict, sources: dict, notes: list) -> None:
    """gunicorn's rule: threads > 1 with no worker_class chosen means gthread."""
    if values["threads"] > 1 and values["worker_class"] == "sync" and sources["worker_class"] == "default":
        values["worker_class"], sources["worker_class"] = "gthread", "threads > 1 (gunicorn's rule)"
        notes.append("worker_class = gthread because threads > 1 (as gunicorn does)")


def _finish(values: dict) -> None:
    """Fill the defaults that depend on the machine, and check settings against each other."""
    if values["control_socket"] is None:
        values["control_socket"] = default_socket_path()
    if values["chdir"] is None:
        values["chdir"] = os.getcwd()
    if values["log_format"] is None:
        values["log_format"] = _default_log_format()
    if values["workers"] > values["max_workers"]:
        raise ConfigError(f"invalid workers: {values['workers']} is above max_workers {values['max_workers']}")
    if values["worker_class"] == "command" and not values["command"]:
        raise ConfigError("invalid command: worker_class = command needs a command to run")
    if values["worker_class"] == "asgi":
        _refuse_what_asgi_lacks(values)


# What the asgi worker does not do yet: refused by name rather than ignored.
_NOT_IN_ASGI = {"certfile": "TLS", "proxy_protocol": "the PROXY protocol",
                "pre_request": "WSGI request hooks", "post_request": "WSGI request hooks"}


def _refuse_what_asgi_lacks(values: dict) -> None:
    for name, what in _NOT_IN_ASGI.items():
        if values.get(name) not in (None, "", "off", False):
            raise ConfigError(f"invalid {name}: the asgi worker does not support {what} yet "
                              "(terminate TLS and PROXY in front of appd, or use gthread)")


def settings_markdown() -> str:
    """The README's settings table, derived from SETTINGS (tests check it is current)."""
    rows = ["| setting | flag | environment | default | meaning |", "| --- | --- | --- | --- | --- |"]
    for s in SETTINGS:
        default = s.default
        if s.name == "python":
            default = "the interpreter running appd"
        elif s.name in ("control_socket_mode", "unix_socket_mode"):
            default = f"{s.default:04o}"
        elif default in (None, [], ""):
            default = "—"
        flag = f"`{s.flag}`" + (f", `{s.short}`" if s.short else "")
        rows.append(f"| `{s.name}` | {flag} | `{s.env}` | `{default}` | {s.help} |".replace("`—`", "—"))
    return "\n".join(rows)


if __name__ == "__main__":
    print(settings_markdown())
