"""Finding and checking the application: import by "module:attribute", and the
in-process readiness GET."""

from __future__ import annotations

import importlib
import io
import sys

DEMO_APP = "appd.demo:app"


class AppLoadError(Exception):
    """The app could not be imported or found; the message names the spec and the cause."""


def load_app(spec: str | None):
    """Import `module:attr` (attr may be a call such as `create_app()`)."""
    spec = spec or DEMO_APP
    module_name, _, attr = spec.partition(":")
    attr = attr or "application"
    module = importlib.import_module(module_name)
    expression = attr.strip()
    name = expression.split("(", 1)[0].strip()
    if not name.isidentifier():
        raise AppLoadError(f"{spec}: {expression!r} is not an attribute name or a call of one")
    try:
        target = getattr(module, name)
    except AttributeError:
        raise AppLoadError(f"{spec}: module {module_name!r} has no attribute {name!r}") from None
    if expression != name:
        if not expression.endswith("()"):
            raise AppLoadError(f"{spec}: only calls without arguments are supported, as in create_app()")
        target = target()
    if not callable(target):
        raise AppLoadError(f"{spec}: {name!r} is not callable")
    return target


def ready_check(app, path: str) -> tuple[bool, str]:
    """GET `path` from the app in-process; return (ok, status line)."""
    outcome = {}

    def start_response(status, headers, exc_info=None):
        outcome["status"] = status
        return lambda data: None

    path_info, _, query = path.partition("?")
    environ = {
        "REQUEST_METHOD": "GET", "SCRIPT_NAME": "", "PATH_INFO": path_info, "QUERY_STRING": query,
        "SERVER_NAME": "appd-ready-check", "SERVER_PORT": "0", "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1", "HTTP_HOST": "localhost", "HTTP_USER_AGENT": "appd-ready-check",
        "wsgi.version": (1, 0), "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(b""),
        "wsgi.errors": sys.stderr, "wsgi.multithread": False, "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    result = app(environ, start_response)
    try:
        for _ in result:
            pass
    finally:
        if hasattr(result, "close"):
            result.close()
    status = outcome.get("status", "no response")
    return status[:1] == "2", status


def call_hook(spec: str | None, subject, log) -> None:
    """Call a `module:function` hook with the master or worker; a failing hook is logged, not fatal."""
    if not spec:
        return
    try:
        module, _, func = spec.partition(":")
        getattr(importlib.import_module(module), func)(subject)
    except Exception:
        log.exception("hook_failed")
