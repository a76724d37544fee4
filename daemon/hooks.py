"""Hooks: finding them, and calling them with gunicorn's signatures.

A hook is `module:function`, or `/path/to/file.py:name` (a gunicorn.conf.py's
own functions: the file is executed once per process that calls a hook from
it, as gunicorn's re-exec'd master re-executes its config file).

gunicorn's hooks get small adapter objects carrying the attributes real
configs use: worker.pid, worker.age, worker.log, worker.alive, server.cfg,
server.log, server.pid, req.method, req.path, req.headers, resp.status, ...

appd's first hooks took one argument: post_fork(worker), worker_exit(worker)
get appd's Worker itself. A post_fork or worker_exit that takes two positional
arguments is gunicorn's (server, worker) form. The rule is the function's
arity, whatever file named it, so a gunicorn-style function works from
appd.toml too.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import time
from types import SimpleNamespace

_files: dict[str, dict] = {}   # path -> namespace of an executed config file
_resolved: dict[str, object] = {}


def resolve(spec: str):
    """The callable a hook spec names (cached per process)."""
    found = _resolved.get(spec)
    if found is None:
        where, _, name = spec.rpartition(":")
        if where.endswith(".py"):
            found = _file_namespace(where)[name]
        else:
            found = getattr(importlib.import_module(where), name)
        _resolved[spec] = found
    return found


def _file_namespace(path: str) -> dict:
    if path not in _files:
        module_spec = importlib.util.spec_from_file_location("__config__", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        _files[path] = vars(module)
    return _files[path]


def positional_arity(func) -> int:
    try:
        params = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return 2
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 2
    return sum(1 for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))


def call(spec: str | None, log, *args) -> None:
    """Call a hook; one that raises is logged with its traceback, never fatal."""
    if not spec:
        return
    try:
        resolve(spec)(*args)
    except Exception:
        log.exception("hook_failed", spec=spec)


# --- gunicorn's objects, as adapters over appd's ---

class GunicornLog:
    """gunicorn's logger methods (printf-style arguments) onto appd's structlog logger."""

    def __init__(self, log):
        self._log = log

    def _emit(self, level: str, msg, args) -> None:
        text = str(msg) % args if args else str(msg)
        getattr(self._log, level)(text)

    def debug(self, msg, *args, **kw): self._emit("debug", msg, args)
    def info(self, msg, *args, **kw): self._emit("info", msg, args)
    def warning(self, msg, *args, **kw): self._emit("warning", msg, args)
    warn = warning
    def error(self, msg, *args, **kw): self._emit("error", msg, args)
    def critical(self, msg, *args, **kw): self._emit("critical", msg, args)
    def exception(self, msg, *args, **kw): self._emit("exception", msg, args)

    def log(self, level, msg, *args, **kw):
        self.info(msg, *args)


class CfgView:
    """server.cfg / worker.cfg: settings by gunicorn's names (accesslog, loglevel...) or appd's."""

    def __init__(self, cfg: dict):
        self._cfg = cfg

    def __getattr__(self, name):
        from .gunicorn import _ANY, BY_GUNICORN
        if name.startswith("_"):
            raise AttributeError(name)
        row = BY_GUNICORN.get(name)
        key = row.appd if row is not None and row.appd else name
        if key in self._cfg:
            return self._cfg[key]
        if row is not None and row.kind != "honoured" and row.default not in (None, _ANY):
            return row.default  # a refused or not-applicable setting: gunicorn's default stands
        raise AttributeError(name)

    @property
    def env(self) -> dict:
        return dict(pair.split("=", 1) for pair in self._cfg.get("raw_env", []))

    @property
    def address(self) -> list:
        return list(self._cfg.get("bind", []))


class ServerView:
    """gunicorn's arbiter, as a hook sees it: appd's master of one generation."""

    def __init__(self, master):
        self._master = master
        self.cfg = CfgView(master.cfg)
        self.log = GunicornLog(master.log)
        self.app = SimpleNamespace(cfg=self.cfg)
        self.pid = master.pid
        self.generation = master.generation
        self.proc_name = master.cfg.proc_name or "appd"
        self.timeout = master.cfg.timeout
        self.master_name = "Master"

    @property
    def num_workers(self) -> int:
        return self._master.target

    @property
    def WORKERS(self) -> dict:
        return {pid: HandleView(handle, self.log) for pid, handle in self._master.workers.items()}

    @property
    def LISTENERS(self) -> list:
        return [listener.sock for listener in self._master.listeners]


class WorkerServerView:
    """The server as a worker's post_fork / worker_exit sees it (gunicorn passes its arbiter)."""

    def __init__(self, worker):
        self.pid = worker.master_pid
        self.cfg = CfgView(worker.cfg)
        self.log = GunicornLog(worker.log)
        self.app = SimpleNamespace(cfg=self.cfg)
        self.generation = worker.generation
        self.proc_name = worker.cfg.proc_name or "appd"
        self.timeout = worker.cfg.timeout
        self.num_workers = worker.cfg.workers


class HandleView:
    """A worker as the master knows it (pre_fork, child_exit): gunicorn's pid and age."""

    def __init__(self, handle, log, serial: int | None = None):
        self.pid = getattr(handle, "pid", None)
        self.age = serial if handle is None else handle.serial
        self.log = log
        self.alive = False
        self.requests = getattr(handle, "requests", 0)
        self.exit_status = getattr(handle, "exit_status", None)


class WorkerView:
    """gunicorn's worker inside the worker process, over appd's Worker."""

    def __init__(self, worker):
        self._worker = worker
        self.pid = os.getpid()
        self.ppid = worker.master_pid
        self.age = worker.serial
        self.cfg = CfgView(worker.cfg)
        self.log = GunicornLog(worker.log)
        self.timeout = worker.cfg.timeout
        self.max_requests = worker.max_requests
        self.sockets = [listener.sock for listener in worker.listeners]
        self.booted = False
        self.aborted = False
        self.started = time.time()

    alive = property(lambda self: self._worker.alive,
                     lambda self, value: setattr(self._worker, "alive", bool(value)))
    nr = property(lambda self: self._worker.requests)
    wsgi = property(lambda self: self._worker.app)
    app = property(lambda self: SimpleNamespace(cfg=self.cfg, wsgi=lambda: self._worker.app))


class RequestView:
    """gunicorn's Request (req) for pre_request and post_request."""

    def __init__(self, req, environ: dict):
        self.method = req.method
        self.uri = environ.get("RAW_URI", "")
        self.path = environ.get("PATH_INFO", "")
        self.query = environ.get("QUERY_STRING", "")
        self.fragment = ""
        major, _, minor = req.version.partition("/")[2].partition(".")
        self.version = (int(major or 1), int(minor or 1))
        self.scheme = environ.get("wsgi.url_scheme", "http")
        self.remote_addr = environ.get("REMOTE_ADDR", "")
        self.headers = [(key[5:].replace("_", "-"), value) for key, value in environ.items()
                        if key.startswith("HTTP_")]
        for key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if key in environ:
                self.headers.append((key.replace("_", "-"), environ[key]))


class ResponseView:
    """gunicorn's Response (resp) for post_request."""

    def __init__(self, resp):
        self.status = resp.status or "499 Client Closed Request"
        self.status_code = int(self.status[:3])
        self.headers = list(resp.headers)
        self.sent = resp.sent
        self.response_length = resp.sent
