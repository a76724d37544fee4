"""Settings, declared once. Every other form (TOML key, APPD_* variable, --flag,
help text, validation) is derived from the SETTINGS table below.

Precedence: defaults < TOML file (--config) < APPD_* environment < flags
(the layering is config_load.py; the kinds of value, config_values.py).
The result is one frozen Settings object, read as `cfg.workers` by the daemon
and by each master alike.
"""

from __future__ import annotations

import os
import sys
import types
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

from appdctl.protocol import default_socket_path  # noqa: F401  (appd and appdctl share it)

from .config_values import (  # noqa: F401  (_bool, _proxy_protocol, seconds: used by cli, commands)
    _argv, _bind, _bool, _cert_reqs, _choice, _env_list, _hook, _int, _int_list, _json_table,
    _mode, _optional_host_port, _optional_str, _proxy_protocol, _ratio, _seconds, _size, _str, _str_list,
    _str_map, _umask, seconds,
)


class ConfigError(Exception):
    """An invalid setting; the message names the setting, the bad value and where it came from."""


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


class Settings:
    """The effective settings, frozen: `cfg.workers`. The daemon gets one from load();
    a master rebuilds one from the values the daemon sends (Settings(values)).
    Read-only mapping access (`cfg["workers"]`, `cfg.get(...)`) is for the gunicorn
    hook views (hooks.py), which look settings up by gunicorn's names. `sources`:
    where each value came from; `notes`: lines to show at start (gunicorn settings
    that are not needed)."""

    __slots__ = ("_values", "_sources", "notes")

    def __init__(self, values: Mapping, sources: Mapping | None = None, notes=()):
        object.__setattr__(self, "_values", types.MappingProxyType(dict(values)))
        object.__setattr__(self, "_sources", types.MappingProxyType(dict(sources or {})))
        object.__setattr__(self, "notes", tuple(notes))

    def __getattr__(self, name: str):
        if name.startswith("_"):  # not a setting; and never recurse before _values is set
            raise AttributeError(name)
        try:
            return self._values[name]
        except KeyError:
            pass
        if name not in BY_NAME:
            raise AttributeError(name)
        # Known but not sent: a daemon older than this master's code does not know it yet.
        return BY_NAME[name].default

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError(f"settings are frozen: cannot set {name} (use updated())")

    @property
    def values(self) -> dict:
        """A plain copy (it crosses msgpack to masters and across re-exec)."""
        return dict(self._values)

    @property
    def sources(self) -> dict:
        return dict(self._sources)

    def __reduce__(self):
        return Settings, (self.values, self.sources, self.notes)

    def updated(self, changes: Mapping) -> Settings:
        """A copy with `changes` applied (a reload's new settings)."""
        return Settings({**self._values, **changes}, self._sources, self.notes)

    # Read-only mapping access, as a dict of the values.
    def __getitem__(self, name: str):
        return self._values[name]

    def get(self, name: str, default=None):
        return self._values.get(name, default)

    def __contains__(self, name) -> bool:
        return name in self._values

    def keys(self):
        return self._values.keys()

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __eq__(self, other) -> bool:
        return isinstance(other, Settings) and self._values == other._values

    __hash__ = None

    def __repr__(self) -> str:
        return f"Settings({dict(self._values)!r})"


Config = Settings  # the daemon's older name


def load(flags: dict | None = None, environ=os.environ) -> Settings:
    """The effective settings: `flags` maps setting names to values given on the command line.
    The layers and the checks are in config_load.py."""
    from .config_load import load_settings
    return load_settings(flags, environ)


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
