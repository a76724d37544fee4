"""/hang never answers (a hung worker); / answers; /healthz fails if UNHEALTHY is set."""

import os
import time


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/hang":
        while True:
            time.sleep(3600)
    if path == "/healthz" and os.environ.get("UNHEALTHY"):
        start_response("503 Service Unavailable", [("Content-Length", "2")])
        return [b"no"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "3")])
    return [b"ok\n"]
