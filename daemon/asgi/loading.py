"""Finding an ASGI app (`module:app`, or `module:create_app` with factory) and
the in-process ready check: a GET of `ready_check` through the app itself."""

from __future__ import annotations

import asyncio
import inspect
import os

from .. import app as app_loading
from .server import ASGI_INFO

DEMO_APP = "appd.asgi.loading:demo_app"


async def demo_app(scope, receive, send):
    """Served by `appd start --worker-class asgi` with no APP."""
    if scope["type"] != "http":
        raise ValueError("the demo app serves HTTP only")
    body = f"Hello from appd (asgi), generation {os.environ.get('APPD_GENERATION', '?')}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
    await send({"type": "http.response.body", "body": body})


def load(spec: str | None, factory: bool, preloaded=None):
    """The ASGI 3 app; AppLoadError naming the cause if it is not one."""
    app = preloaded if preloaded is not None else app_loading.load_app(spec or DEMO_APP)
    if factory:  # also when preloaded: the master imported the factory, each worker calls it
        app = app()
    if not is_asgi3(app):
        raise app_loading.AppLoadError(
            f"{spec}: {app!r} is not an ASGI 3 application (an async callable taking "
            "scope, receive, send); WSGI apps run with worker_class sync or gthread"
            + ("" if factory else ", and an app factory needs --factory"))
    return app


def is_asgi3(app) -> bool:
    if inspect.isclass(app):
        return False  # ASGI 2 (a class instantiated per scope)
    call = app if inspect.isfunction(app) or inspect.ismethod(app) else getattr(app, "__call__", None)
    return inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(app)


async def ready_check(app, path: str, state: dict | None) -> tuple[bool, str]:
    """GET `path` from the app in-process; (ok, status)."""
    raw_path, _, query = path.encode("latin-1").partition(b"?")
    scope = {"type": "http", "asgi": ASGI_INFO, "http_version": "1.1", "method": "GET",
             "scheme": "http", "path": raw_path.decode("latin-1"), "raw_path": raw_path,
             "query_string": query, "root_path": "", "server": ("appd-ready-check", 0),
             "client": ("127.0.0.1", 0), "headers": [(b"host", b"localhost"),
                                                     (b"user-agent", b"appd-ready-check")]}
    if state is not None:
        scope["state"] = state.copy()
    outcome: dict = {}
    done = asyncio.Event()

    async def receive():
        if not outcome.get("asked"):
            outcome["asked"] = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            outcome["status"] = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await app(scope, receive, send)
    done.set()
    status = outcome.get("status")
    return status is not None and 200 <= status < 300, str(status or "no response")


def check(spec: str | None, factory: bool, path: str | None) -> None:
    """`appd check` for worker_class = asgi, in a child interpreter: load the app as a
    worker does, run the lifespan startup, the ready check, then the shutdown.
    Exits with the reason on failure."""
    import sys

    from .lifespan import Lifespan, LifespanFailed

    async def run() -> None:
        app = load(spec, factory)
        lifespan = Lifespan(app, asyncio.get_running_loop())
        try:
            await lifespan.startup()
        except LifespanFailed as exc:
            sys.exit(f"ASGI lifespan startup failed: {exc}")
        if path:
            ok, status = await ready_check(app, path, lifespan.state if lifespan.supported else None)
            if not ok:
                sys.exit(f"ready_check GET {path} answered {status!r}")
        await lifespan.shutdown(10.0)
    asyncio.run(run())
