"""An app that takes APP_IMPORT_SECONDS (default 2) to import."""

import os
import time

time.sleep(float(os.environ.get("APP_IMPORT_SECONDS", "2")))


def app(environ, start_response):
    body = f"slow app, pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
