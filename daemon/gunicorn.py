"""gunicorn, spoken: its Python config file, its flag spellings, GUNICORN_CMD_ARGS
and WEB_CONCURRENCY, mapped onto appd's settings through ONE table (ROWS).

Every gunicorn 27 setting has a row and one of three fates:
  honoured        it becomes the appd setting named in the row (converted when
                  the forms differ);
  refused         appd cannot do it: a value other than gunicorn's default
                  stops `appd start` with one line naming the setting and why;
  not applicable  appd's design already covers it: accepted, with one line
                  saying why nothing is needed.
Nothing is ignored silently. Where the values come from (the config file,
flags, GUNICORN_CMD_ARGS) is gunicorn_sources.py; the table for people and
`appd migrate` are gunicorn_report.py.

Precedence, lowest first: defaults < WEB_CONCURRENCY and FORWARDED_ALLOW_IPS
(gunicorn's defaults for workers and forwarded_allow_ips) < the config file
(appd.toml, gunicorn.conf.py or python:module) < GUNICORN_CMD_ARGS < APPD_*
variables < command-line flags (appd's or gunicorn's spellings).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any, Callable

HONOURED, REFUSED, NOT_APPLICABLE = "honoured", "refused", "not applicable"
DEFAULT_FILE = "gunicorn.conf.py"
_ANY = object()  # a refused/not-applicable row with no harmless value: any value counts


class Refused(ValueError):
    """A value appd cannot honour; the message says why."""


@dataclass(frozen=True)
class Row:
    name: str                     # gunicorn's setting name
    flags: tuple = ()             # gunicorn's command-line spellings
    appd: str | None = None       # the appd setting it becomes (honoured)
    convert: Callable | None = None  # gunicorn value -> appd value; may raise Refused
    why: str = ""                 # refused / not applicable: the reason, for humans
    default: Any = _ANY           # gunicorn's default: a refused row at it is harmless
    kind: str = HONOURED
    action: str | None = None     # argparse action of the flag (store_true, append, ...)

    def fate(self) -> str:
        """Honoured only when this appd build has the target setting (others add some)."""
        from .config import BY_NAME
        if self.kind == HONOURED and self.appd not in BY_NAME:
            return REFUSED
        return self.kind

    def reason(self) -> str:
        if self.kind == HONOURED and self.fate() == REFUSED:
            return f"this appd has no {self.appd} setting yet"
        return self.why


def ok(name, flags=(), appd=None, convert=None, action=None) -> Row:
    return Row(name, tuple(flags), appd or name, convert, action=action)


def no(name, flags=(), default=_ANY, why="", action=None) -> Row:
    return Row(name, tuple(flags), why=why, default=default, kind=REFUSED, action=action)


def na(name, flags=(), default=_ANY, why="", action=None) -> Row:
    return Row(name, tuple(flags), why=why, default=default, kind=NOT_APPLICABLE, action=action)


# --- value conversions (gunicorn's forms -> appd's) ---

_WORKER_CLASSES = {"sync": "sync", "gthread": "gthread",
                   "gunicorn.workers.sync.SyncWorker": "sync",
                   "gunicorn.workers.gthread.ThreadWorker": "gthread",
                   "uvicorn.workers.UvicornWorker": "asgi", "uvicorn_worker.UvicornWorker": "asgi",
                   "asgi": "asgi", "gunicorn.workers.gasgi.ASGIWorker": "asgi"}


def _worker_class(value):
    name = _WORKER_CLASSES.get(str(value))
    if name is None:
        raise Refused(f"appd has no {value} worker; use sync or gthread (threads) instead")
    if name == "asgi":
        from .config import BY_NAME
        try:
            BY_NAME["worker_class"].parse("asgi")
        except ValueError:
            raise Refused("this appd has no asgi worker yet; use a WSGI app with sync or gthread") from None
    return name


def _loglevel(value):
    return "error" if str(value).lower() == "critical" else str(value).lower()


def _as_list(value):
    return [part.strip() for part in value.split(",") if part.strip()] if isinstance(value, str) else list(value)


def _as_str(value):
    return None if value is None else str(value)


def _sendfile(value):
    if value is False:
        raise Refused("appd always uses sendfile() for wsgi.file_wrapper; it cannot be turned off")
    return None


def _logconfig_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        raise Refused(f"cannot read {path} as JSON: {exc}") from None


def _only(value_ok, why):
    def convert(value):
        if value != value_ok:
            raise Refused(why)
        return None
    return convert


def _statsd(name):
    return ok(name, [f"--{name.replace('_', '-')}"])


_HOOKS = ("on_starting", "on_reload", "when_ready", "pre_fork", "post_fork", "post_worker_init",
          "worker_int", "worker_abort", "pre_exec", "pre_request", "post_request", "child_exit",
          "worker_exit", "nworkers_changed", "on_exit")
_HTTP2 = "appd speaks HTTP/1.1; put an HTTP/2 proxy (nginx, haproxy) in front"
_DIRTY = "appd has no dirty arbiters; run long jobs in a task queue"
_PARSER = "appd's httptools parser is strict and has no such switch"
_SYSLOG = "appd logs to error_log (JSON or console); journald or a log shipper takes it from there"

ROWS: list[Row] = [
    ok("config", ["-c", "--config"]),
    ok("wsgi_app", appd="app"),
    ok("bind", ["-b", "--bind"], convert=_as_list, action="append"),
    ok("backlog", ["--backlog"]),
    ok("workers", ["-w", "--workers"]),
    ok("worker_class", ["-k", "--worker-class"], convert=_worker_class),
    ok("threads", ["--threads"]),
    ok("worker_connections", ["--worker-connections"]),
    ok("max_requests", ["--max-requests"]),
    ok("max_requests_jitter", ["--max-requests-jitter"]),
    ok("timeout", ["-t", "--timeout"]),
    ok("graceful_timeout", ["--graceful-timeout"]),
    ok("keepalive", ["--keep-alive"]),
    ok("limit_request_line", ["--limit-request-line"]),
    ok("limit_request_fields", ["--limit-request-fields"]),
    ok("limit_request_field_size", ["--limit-request-field_size", "--limit-request-field-size"]),
    no("reload", ["--reload"], False, "appd does not watch files; `appdctl reload` (or `upgrade`) "
       "loads new code without dropping a request", action="store_true"),
    no("reload_engine", ["--reload-engine"], "auto", "appd does not watch files (see reload)"),
    no("reload_extra_files", ["--reload-extra-file"], [], "appd does not watch files (see reload)",
       action="append"),
    no("spew", ["--spew"], False, "appd has no line tracer; use py-spy on a worker", action="store_true"),
    na("check_config", ["--check-config"], False, "the flag runs `appd check`", action="store_true"),
    no("print_config", ["--print-config"], False, "use `appd migrate FILE` to see the settings appd "
       "would use", action="store_true"),
    ok("preload_app", ["--preload"], action="store_true"),
    Row("sendfile", ("--no-sendfile",), None, _sendfile, kind=REFUSED, default=None,
        why="appd always uses sendfile() for wsgi.file_wrapper", action="store_const"),
    na("reuse_port", ["--reuse-port"], False, "the daemon binds each listener once and every worker "
       "shares it; the kernel already spreads connections", action="store_true"),
    ok("chdir", ["--chdir"]),
    no("daemon", ["-D", "--daemon"], False, "appd runs in the foreground; run it under systemd "
       "(systemd/appd.service) or a container runtime", action="store_true"),
    ok("raw_env", ["-e", "--env"], convert=_as_list, action="append"),
    ok("pidfile", ["-p", "--pid"]),
    na("worker_tmp_dir", ["--worker-tmp-dir"], None, "appd workers heartbeat over a socket, not a "
       "temporary file"),
    ok("user", ["-u", "--user"], convert=_as_str),
    ok("group", ["-g", "--group"], convert=_as_str),
    ok("umask", ["-m", "--umask"]),
    ok("initgroups", ["--initgroups"], action="store_true"),
    na("tmp_upload_dir", [], None, "unused by gunicorn too"),
    ok("secure_scheme_headers"),
    ok("forwarded_allow_ips", ["--forwarded-allow-ips"], convert=_as_list),
    ok("accesslog", ["--access-logfile"], appd="access_log"),
    na("disable_redirect_access_to_syslog", ["--disable-redirect-access-to-syslog"], False,
       "appd has no syslog output", action="store_true"),
    ok("access_log_format", ["--access-logformat"]),
    ok("errorlog", ["--error-logfile", "--log-file"], appd="error_log"),
    ok("loglevel", ["--log-level"], appd="log_level", convert=_loglevel),
    ok("capture_output", ["--capture-output"], action="store_true"),
    no("logger_class", ["--logger-class"], "gunicorn.glogging.Logger", "appd logs with structlog; "
       "configure the app's stdlib logging with logconfig_dict"),
    no("logconfig", ["--log-config"], None, "appd takes logconfig_dict (or logconfig_json), not an "
       "ini file"),
    ok("logconfig_dict"),
    ok("logconfig_json", ["--log-config-json"], appd="logconfig_dict", convert=_logconfig_json),
    no("syslog_addr", ["--log-syslog-to"], "udp://localhost:514", _SYSLOG),
    no("syslog", ["--log-syslog"], False, _SYSLOG, action="store_true"),
    no("syslog_prefix", ["--log-syslog-prefix"], None, _SYSLOG),
    no("syslog_facility", ["--log-syslog-facility"], "user", _SYSLOG),
    na("enable_stdio_inheritance", ["-R", "--enable-stdio-inheritance"], False, "a generation's "
       "stdout and stderr always reach the daemon's stderr", action="store_true"),
    _statsd("statsd_host"),
    no("dogstatsd_tags", ["--dogstatsd-tags"], "", "appd's statsd output has no tags"),
    _statsd("statsd_prefix"),
    na("enable_backlog_metric", ["--enable-backlog-metric"], False, "`appdctl status` always reports "
       "each listener's queued connections", action="store_true"),
    ok("proc_name", ["-n", "--name"]),
    na("default_proc_name", [], "gunicorn", "internal to gunicorn (the app's name)"),
    ok("pythonpath", ["--pythonpath"]),
    no("paste", ["--paste", "--paster"], None, "appd loads module:app, not PasteDeploy files"),
    *[ok(hook) for hook in _HOOKS],
    no("ssl_context", [], _ANY, "appd builds the TLS context from certfile, keyfile, ca_certs, "
       "cert_reqs and ciphers"),
    ok("proxy_protocol", ["--proxy-protocol"]),
    ok("proxy_allow_ips", ["--proxy-allow-from"], convert=_as_list),
    Row("protocol", ("--protocol",), None, _only("http", "appd speaks HTTP only, not uwsgi"),
        kind=REFUSED, default="http", why="appd speaks HTTP only, not uwsgi"),
    na("uwsgi_allow_ips", ["--uwsgi-allow-from"], "127.0.0.1,::1", "appd speaks HTTP only"),
    ok("keyfile", ["--keyfile"]),
    ok("certfile", ["--certfile"]),
    na("ssl_version", ["--ssl-version"], _ANY, "deprecated by gunicorn; appd negotiates TLS 1.2 or newer"),
    ok("cert_reqs", ["--cert-reqs"], convert=int),
    ok("ca_certs", ["--ca-certs"]),
    na("suppress_ragged_eofs", ["--suppress-ragged-eofs"], True, "appd treats a ragged EOF as the "
       "client leaving", action="store_true"),
    na("do_handshake_on_connect", ["--do-handshake-on-connect"], False, "appd's workers handshake "
       "right after accept, with the header timeout", action="store_true"),
    ok("ciphers", ["--ciphers"]),
    no("http_protocols", ["--http-protocols"], "h1", _HTTP2),
    no("http2_cleartext", ["--http2-cleartext"], "off", _HTTP2),
    no("http2_max_concurrent_streams", ["--http2-max-concurrent-streams"], 100, _HTTP2),
    no("http2_initial_window_size", ["--http2-initial-window-size"], 65535, _HTTP2),
    no("http2_max_frame_size", ["--http2-max-frame-size"], 16384, _HTTP2),
    no("http2_max_header_list_size", ["--http2-max-header-list-size"], 65536, _HTTP2),
    no("raw_paste_global_conf", ["--paste-global"], [], "appd loads module:app, not PasteDeploy files",
       action="append"),
    no("permit_obsolete_folding", ["--permit-obsolete-folding"], False, _PARSER, action="store_true"),
    no("strip_header_spaces", ["--strip-header-spaces"], False, _PARSER, action="store_true"),
    no("permit_unconventional_http_method", ["--permit-unconventional-http-method"], False, _PARSER,
       action="store_true"),
    no("permit_unconventional_http_version", ["--permit-unconventional-http-version"], False, _PARSER,
       action="store_true"),
    no("casefold_http_method", ["--casefold-http-method"], False, _PARSER, action="store_true"),
    ok("forwarder_headers", ["--forwarder-headers"], convert=_as_list),
    no("header_map", ["--header-map"], "drop", "appd keeps headers with underscores apart from the "
       "forwarder_headers a trusted proxy sets; there is no other mode"),
    no("asgi_loop", ["--asgi-loop"], "auto", "appd's asgi worker (when present) picks its own loop"),
    no("asgi_lifespan", ["--asgi-lifespan"], "auto", "appd's asgi worker (when present) always runs "
       "lifespan when the app supports it"),
    no("asgi_disconnect_grace_period", ["--asgi-disconnect-grace-period"], 3, "no such switch in appd"),
    no("websocket_max_message_size", ["--websocket-max-message-size"], 16777216, "no such switch in appd"),
    na("http_parser", ["--http-parser"], _ANY, "appd always parses with httptools"),
    no("root_path", ["--root-path"], "", "send SCRIPT_NAME from a trusted proxy (forwarder_headers) "
       "or mount the app under its prefix"),
    no("dirty_apps", ["--dirty-app"], [], _DIRTY, action="append"),
    no("dirty_workers", ["--dirty-workers"], 0, _DIRTY),
    no("dirty_timeout", ["--dirty-timeout"], 300, _DIRTY),
    no("dirty_threads", ["--dirty-threads"], 1, _DIRTY),
    no("dirty_graceful_timeout", ["--dirty-graceful-timeout"], 30, _DIRTY),
    *[no(hook, [], _ANY, _DIRTY) for hook in ("on_dirty_starting", "dirty_post_fork",
                                              "dirty_worker_init", "dirty_worker_exit")],
    ok("control_socket", ["--control-socket"]),
    ok("control_socket_mode", ["--control-socket-mode"]),
    no("control_socket_disable", ["--no-control-socket"], False, "appdctl needs the control socket; "
       "restrict it with control_socket_mode and control_allow_uids", action="store_true"),
]
BY_GUNICORN = {row.name: row for row in ROWS}
# Variables gunicorn reads for its defaults: below every config file.
ENV_DEFAULTS = {"WEB_CONCURRENCY": "workers", "FORWARDED_ALLOW_IPS": "forwarded_allow_ips"}


@dataclass
class Translation:
    values: dict        # appd setting -> value, ready for config's parsers
    sources: dict       # appd setting -> where it came from
    notes: list         # one line per not-applicable setting that was given
    refused: list       # one line per setting appd cannot honour


def translate(given: dict, source: str) -> Translation:
    """Map gunicorn-named settings (and appd's own names) onto appd's settings."""
    from .config import BY_NAME
    out = Translation({}, {}, [], [])
    for name, value in given.items():
        row = BY_GUNICORN.get(name)
        if row is None:  # an appd-only setting written in the gunicorn file: taken as is
            out.values[name], out.sources[name] = value, source
            continue
        _translate_one(row, value, source, out, BY_NAME)
    return out


def _translate_one(row: Row, value, source: str, out: Translation, appd_settings: dict) -> None:
    fate = row.fate()
    if fate != HONOURED:
        if row.default is not _ANY and _same(value, row.default):
            return  # gunicorn's default: nothing to honour
        if row.convert is not None and fate == REFUSED and row.kind == REFUSED:
            try:
                row.convert(value)
                return  # the converter accepts this value (e.g. sendfile = True)
            except Refused:
                pass
        line = f"{row.name} = {value!r} (from {source}): {row.reason()}"
        (out.refused if fate == REFUSED else out.notes).append(line)
        return
    try:
        converted = row.convert(value) if row.convert else value
    except Refused as exc:
        out.refused.append(f"{row.name} = {value!r} (from {source}): {exc}")
        return
    out.values[row.appd], out.sources[row.appd] = converted, source


def _same(value, default) -> bool:
    if isinstance(default, list) and isinstance(value, str):
        return _as_list(value) == default
    return value == default


if __name__ == "__main__":
    from .gunicorn_report import main
    sys.exit(main())
