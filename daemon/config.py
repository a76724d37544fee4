"""Settings, declared once. Every other form (TOML key, APPD_* variable, --flag,
help text, validation) is derived from the SETTINGS table below.

Precedence: defaults < TOML file (--config) < APPD_* environment < flags.
"""

from __future__ import annotations

import os
import sys
import tomllib
from dataclasses import dataclass, field
from typing import Any, Callable

from appdctl.protocol import default_socket_path


class ConfigError(Exception):
    """An invalid setting; the message names the setting, the bad value and where it came from."""


# --- value parsers: each takes a TOML value or a string and returns the typed value ---

def _int(minimum: int | None = None, maximum: int | None = None) -> Callable:
    def parse(value):
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError(f"{value!r} is not an integer")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"{value!r} is not an integer") from None
        if minimum is not None and number < minimum:
            raise ValueError(f"{number} is below the minimum {minimum}")
        if maximum is not None and number > maximum:
            raise ValueError(f"{number} is above the maximum {maximum}")
        return number
    parse.__name__ = "integer"
    return parse


def _seconds(value):
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of seconds")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{value!r} is not a number of seconds") from None
    if number < 0:
        raise ValueError(f"{number} is negative")
    return number


def _bool(value):
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not a boolean (use true or false)")


def _str(value):
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a string")
    return value


def _optional_str(value):
    if value is None or value == "":
        return None
    return _str(value)


def _choice(*choices: str) -> Callable:
    def parse(value):
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return parse


def _str_list(value):
    """A list from TOML, or a comma-separated string from the environment."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise ValueError(f"{value!r} is not a list of strings")


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
        raise ValueError(f"{value!r} is not a list of integers") from None


def _mode(value):
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        try:
            number = int(str(value), 8)
        except ValueError:
            raise ValueError(f"{value!r} is not an octal file mode such as 0600") from None
    if not 0 <= number <= 0o777:
        raise ValueError(f"{value!r} is not a file mode between 0000 and 0777")
    return number


def _hook(value):
    value = _optional_str(value)
    if value is not None and ":" not in value:
        raise ValueError(f"{value!r} is not of the form module:function")
    return value


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

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "APPD_" + self.name.upper()


def _default_log_format() -> str:
    return "console" if sys.stderr.isatty() else "json"


SETTINGS: list[Setting] = [
    Setting("config", _optional_str, None, "TOML file of settings", short="-c", metavar="FILE"),
    Setting("app", _optional_str, None, "WSGI app as module:attribute (default: the built-in demo app)",
            metavar="MODULE:APP"),
    Setting("bind", _bind, ["127.0.0.1:8000"], "addresses to listen on: HOST:PORT, [V6]:PORT, "
            "unix:PATH or fd://N (repeatable)", short="-b", metavar="ADDRESS"),
    Setting("workers", _int(1), 2, "number of worker processes", short="-w", metavar="N"),
    Setting("max_workers", _int(1), 64, "upper bound for `appdctl scale`", metavar="N"),
    Setting("worker_class", _choice("sync", "gthread", "command"), "sync",
            "sync (one request at a time), gthread (thread pool, keep-alive) or command (any program)",
            metavar="CLASS"),
    Setting("threads", _int(1), 1, "threads per worker (gthread)", metavar="N"),
    Setting("worker_connections", _int(1), 1000, "most connections a gthread worker holds at once "
            "(busy, waiting for a thread, or idle keep-alive)", metavar="N"),
    Setting("command", _argv, [], "program each worker runs (worker_class = command); it gets the "
            "listeners as LISTEN_FDS", metavar="ARGV"),
    Setting("ready_delay", _seconds, 1.0, "seconds after which a command worker that never sends "
            "READY=1 counts as ready", metavar="S"),
    Setting("timeout", _seconds, 30.0, "a ready worker silent this long is killed (SIGABRT, then SIGKILL)",
            short="-t", metavar="S"),
    Setting("graceful_timeout", _seconds, 30.0, "time allowed to finish in-flight requests when "
            "stopping, before SIGKILL", metavar="S"),
    Setting("boot_timeout", _seconds, 60.0, "time a new generation or worker has to become ready",
            metavar="S"),
    Setting("ready_check", _optional_str, None, "path each worker GETs in-process (2xx wanted) before "
            "it counts as ready, e.g. /healthz", metavar="PATH"),
    Setting("max_requests", _int(0), 0, "restart a worker after this many requests (0: never)", metavar="N"),
    Setting("max_requests_jitter", _int(0), 0, "random extra requests added to max_requests per worker",
            metavar="N"),
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
    Setting("post_fork", _hook, None, "called in each worker after fork: f(worker)", metavar="MOD:FUNC"),
    Setting("worker_exit", _hook, None, "called in each worker as it exits: f(worker)", metavar="MOD:FUNC"),
    Setting("on_ready", _hook, None, "called in the master when its generation is ready: f(master)",
            metavar="MOD:FUNC"),
]
BY_NAME = {s.name: s for s in SETTINGS}
# Options of `appd start` that name the file itself are not read from the file.
_NOT_IN_FILE = {"config"}


@dataclass
class Config:
    values: dict = field(default_factory=dict)
    sources: dict = field(default_factory=dict)  # setting name -> where its value came from

    def __getattr__(self, name):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


def _apply(values: dict, sources: dict, name: str, raw, source: str) -> None:
    setting = BY_NAME[name]
    try:
        values[name] = setting.parse(raw)
    except ValueError as exc:
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
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    # Accept both a flat file and one with an [appd] table.
    if isinstance(data.get("appd"), dict):
        data = data["appd"]
    return data


def load(flags: dict | None = None, environ=os.environ) -> Config:
    """Build the effective config. `flags` maps setting names to values given on the command line."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    values = {s.name: s.default for s in SETTINGS}
    sources = {s.name: "default" for s in SETTINGS}
    config_path = flags.get("config") or environ.get(BY_NAME["config"].env)
    if config_path:
        _apply(values, sources, "config", config_path, "command line" if "config" in flags else "environment")
        for name, raw in read_file(config_path).items():
            if name not in BY_NAME or name in _NOT_IN_FILE:
                raise ConfigError(f"unknown setting {name!r} in {config_path}")
            _apply(values, sources, name, raw, config_path)
    for setting in SETTINGS:
        if setting.env in environ and setting.name != "config":
            _apply(values, sources, setting.name, environ[setting.env], setting.env)
    for name, raw in flags.items():
        if name != "config":
            _apply(values, sources, name, raw, BY_NAME[name].flag)
    _finish(values)
    return Config(values, sources)


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
