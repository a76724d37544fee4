"""Hello-world WSGI app, the same module for appd and gunicorn.

    /             Hello, world! and the pid that answered (like appd's demo app)
    /sleep?s=N    marks the worker busy, sleeps N seconds, answers
"""

import os
import time

from _marks import mark

_BODIES = {}  # pid -> body: read per request, since a preloaded module was imported in the master


def app(environ, start_response):
    if environ["PATH_INFO"] == "/sleep":
        mark("busy")
        seconds = float(environ.get("QUERY_STRING", "s=1").partition("=")[2] or 1)
        time.sleep(min(seconds, 30.0))
    pid = os.getpid()
    body = _BODIES.get(pid) or _BODIES.setdefault(pid, f"Hello, world! pid {pid}\n".encode())
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


mark("ready")
