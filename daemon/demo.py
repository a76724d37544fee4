"""The built-in demo app that `appd start` serves when no app is named.

    /            hello, with the generation and pid that answered
    /healthz     200 ok (a ready_check target)
    /slow?s=2    answers after sleeping s seconds (for drain demos)
    /echo        echoes a POST body
"""

import os
import time
from urllib.parse import parse_qs

_HELLO = f"Hello from appd (generation {os.environ.get('APPD_GENERATION', '?')})\n"


def app(environ, start_response):
    path = environ["PATH_INFO"]
    if path == "/healthz":
        body = b"ok\n"
    elif path == "/slow":
        seconds = float(parse_qs(environ.get("QUERY_STRING", "")).get("s", ["1"])[0])
        time.sleep(min(seconds, 300.0))
        body = f"slept {seconds} s in pid {os.getpid()}\n".encode()
    elif path == "/echo":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length)
    elif path == "/":
        body = (_HELLO[:-1] + f" pid {os.getpid()}\n").encode()
    else:
        start_response("404 Not Found", [("Content-Type", "text/plain"), ("Content-Length", "10")])
        return [b"not found\n"]
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
