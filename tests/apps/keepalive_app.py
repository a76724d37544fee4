"""The keep-alive tests' app: every answer names the code version and the
process that ran it, so a test can tell which generation served a request
on a connection it kept open.

    any path   "<APP_VERSION> gen <APPD_GENERATION> pid <pid> path <PATH_INFO> read <n>"
               (a request body is read whole; n is its length)
    /slow?s=N  sleeps N s first
"""

import os
import time
from urllib.parse import parse_qs

VERSION = os.environ.get("APP_VERSION", "v1")


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/slow":
        time.sleep(float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0]))
    text = (f"{VERSION} gen {os.environ.get('APPD_GENERATION')} pid {os.getpid()} "
            f"path {environ['PATH_INFO']} read {len(body)}\n")
    data = text.encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]
