"""Per request, after the app: the access log line (appd's own, or gunicorn's
access_log_format atoms) and gunicorn's pre_request / post_request hooks.

A worker builds one RequestLog; the request layer calls before() when the
environ is complete and write() when the response is done. In JSON mode a
gunicorn format's atoms become the keys of the JSON line.

Atoms (gunicorn's): h remote address, l '-', u user, t time [date], r request
line, m method, U path, q query, H protocol, s status, B bytes, b bytes or
'-', f referer, a user agent, T seconds, M milliseconds, D microseconds,
L seconds with decimals, p pid, {header}i request header, {header}o response
header, {variable}e environ variable.
"""

from __future__ import annotations

import base64
import json
import os
import re
import time

from . import hooks, log
from .probation import note_failure

_ATOM = re.compile(r"%\(([^)]+)\)s")
_ESCAPES = {ord('"'): '\\"', ord("\\"): "\\\\", **{c: f"\\x{c:02x}" for c in range(32)}, 127: "\\x7f"}


def escape(text: str) -> str:
    """Quote-safe: a client cannot forge fields or lines of the log with " or control bytes."""
    return text.translate(_ESCAPES)


class Atoms(dict):
    """gunicorn's atoms, computed when the format asks for them; '-' when unknown."""

    def __init__(self, environ: dict, req, resp, duration_s: float):
        super().__init__()
        self.environ, self.req, self.resp, self.duration = environ, req, resp, duration_s

    def __missing__(self, key: str) -> str:
        value = self.compute(key)
        self[key] = value = "-" if value in (None, "") else value
        return value

    def compute(self, key: str):
        env, resp = self.environ, self.resp
        if key.startswith("{") and key.endswith("}i"):
            name = key[1:-2].upper().replace("-", "_")
            return escape(env.get(name if name in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + name, ""))
        if key.startswith("{") and key.endswith("}o"):
            name = key[1:-2].lower()
            headers = resp.headers if resp is not None else []
            return escape(next((str(v) for k, v in headers if k.lower() == name), ""))
        if key.startswith("{") and key.endswith("}e"):
            return escape(str(env.get(key[1:-2], "")))
        simple = _SIMPLE.get(key)
        return simple(self) if simple else None

    # the simple atoms, one small function each
    def status(self) -> str:
        return (self.resp.status if self.resp is not None and self.resp.status else "499")[:3]

    def length(self) -> int:
        return self.resp.sent if self.resp is not None else 0

    def request_line(self) -> str:
        env = self.environ
        return escape(f"{env.get('REQUEST_METHOD', '-')} {env.get('RAW_URI', '-')} "
                      f"{env.get('SERVER_PROTOCOL', '-')}")

    def user(self) -> str:
        auth = self.environ.get("HTTP_AUTHORIZATION", "")
        if auth[:6].lower() == "basic ":
            try:
                return escape(base64.b64decode(auth[6:]).decode("utf-8").split(":", 1)[0])
            except (ValueError, UnicodeDecodeError):
                return "-"
        return "-"


_SIMPLE = {
    "h": lambda a: a.environ.get("REMOTE_ADDR", "-") or "-",
    "l": lambda a: "-",
    "u": Atoms.user,
    "t": lambda a: time.strftime("[%d/%b/%Y:%H:%M:%S %z]"),
    "r": Atoms.request_line,
    "m": lambda a: escape(a.environ.get("REQUEST_METHOD", "-")),
    "U": lambda a: escape(a.environ.get("PATH_INFO", "")),
    "q": lambda a: escape(a.environ.get("QUERY_STRING", "")),
    "H": lambda a: a.environ.get("SERVER_PROTOCOL", "-"),
    "s": Atoms.status,
    "B": lambda a: str(a.length()),
    "b": lambda a: str(a.length()) if a.length() else "-",
    "f": lambda a: escape(a.environ.get("HTTP_REFERER", "")),
    "a": lambda a: escape(a.environ.get("HTTP_USER_AGENT", "")),
    "T": lambda a: str(int(a.duration)),
    "M": lambda a: str(int(a.duration * 1000)),
    "D": lambda a: str(int(a.duration * 1_000_000)),
    "L": lambda a: f"{a.duration:.6f}",
    "p": lambda a: f"<{os.getpid()}>",
}


class RequestLog:
    """The worker's per-request observer: access log and request hooks. False when idle."""

    def __init__(self, worker):
        cfg = worker.cfg
        self.destination = log.LogFile(cfg.access_log) if cfg.access_log else None
        if self.destination is not None:
            log.register(self.destination)
        self.json = cfg.log_format == "json"
        self.format = cfg.access_log_format
        self.keys = _ATOM.findall(self.format) if self.format else []
        self.worker = worker
        self.counts = getattr(worker, "counts", None)  # request metrics (metrics_bind/statsd_host)
        self.pre_request = cfg.pre_request
        self.post_request = cfg.post_request

    def __bool__(self) -> bool:
        return bool(self.destination or self.pre_request or self.post_request or self.counts)

    def before(self, req, environ: dict) -> None:
        if self.pre_request:
            hooks.call(self.pre_request, self.worker.log, self.worker.view,
                       hooks.RequestView(req, environ))

    def write(self, environ: dict, req, resp, duration_s: float) -> None:
        if self.counts is not None:
            answered = resp is not None and resp.status
            status = resp.status[:3] if answered else "499"
            self.counts.observe_environ(environ, status, resp.sent if resp is not None else 0, duration_s)
            if status[:1] == "5":  # probation's evidence: which paths fail, with which status
                note_failure(self.counts, environ.get("PATH_INFO", ""), status)
        if self.post_request:
            hooks.call(self.post_request, self.worker.log, self.worker.view,
                       hooks.RequestView(req, environ), environ, hooks.ResponseView(resp))
        if self.destination is not None:
            self.destination.write(self.line(Atoms(environ, req, resp, duration_s)) + "\n")

    def write_asgi(self, scope: dict, status: int, sent: int, duration_s: float,
                   headers=()) -> None:
        """An ASGI request's line (the asgi worker): its scope read as the environ the atoms use.
        gunicorn's pre_request/post_request are WSGI hooks and are not called here."""
        if self.counts is not None:
            server = scope.get("server") or ("", "")
            self.counts.observe(f"{server[0]}:{server[1]}", scope.get("method", "WEBSOCKET"), str(status),
                                sent, duration_s)
            if str(status)[:1] == "5":
                note_failure(self.counts, scope.get("path", ""), str(status))
        if self.destination is None:
            return
        query = scope.get("query_string", b"").decode("latin-1")
        path = scope.get("raw_path") or scope.get("path", "").encode("utf-8")
        environ = {"REQUEST_METHOD": scope.get("method", "GET"), "QUERY_STRING": query,
                   "PATH_INFO": scope.get("path", ""), "SERVER_PROTOCOL": "HTTP/" + scope.get("http_version", "1.1"),
                   "RAW_URI": path.decode("latin-1") + ("?" + query if query else ""),
                   "REMOTE_ADDR": (scope.get("client") or ("",))[0]}
        for name, value in scope.get("headers", ()):
            key = name.decode("latin-1").upper().replace("-", "_")
            environ[key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key] = value.decode("latin-1")
        resp = _Answered(str(status))
        resp.sent, resp.headers = sent, [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
        self.destination.write(self.line(Atoms(environ, None, resp, duration_s)) + "\n")

    def write_error(self, conn_env: dict, status: str) -> None:
        """A request that could not be parsed: no method, path or app."""
        if self.destination is not None:
            resp = _Answered(status)
            environ = {"REMOTE_ADDR": conn_env.get("REMOTE_ADDR", "")}
            self.destination.write(self.line(Atoms(environ, None, resp, 0.0)) + "\n")

    def line(self, atoms: Atoms) -> str:
        if self.format and self.json:
            return json.dumps({"event": "access", **{key: atoms[key] for key in self.keys},
                               "generation": log.generation(), "pid": os.getpid()})
        if self.format:
            return self.format % atoms
        if self.json:
            env = atoms.environ
            return json.dumps({"event": "access", "remote": atoms["h"], "method": env.get("REQUEST_METHOD", "-"),
                               "path": env.get("RAW_URI", "-"), "http": env.get("SERVER_PROTOCOL", "-"),
                               "status": int(atoms.status()), "bytes": atoms.length(),
                               "duration_ms": round(atoms.duration * 1000, 3),
                               "generation": log.generation(), "pid": os.getpid()})
        return (f'{atoms["h"]} "{atoms["r"]}" {atoms.status()} {atoms.length()} '
                f'{atoms.duration * 1000:.1f}ms generation={log.generation()} pid={os.getpid()}')


class _Answered:
    """The response of a request that never reached the app (e.g. 400 for a bad head)."""

    def __init__(self, status: str):
        self.status, self.sent, self.headers = status, 0, []
