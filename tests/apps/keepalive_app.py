"""The keep-alive tests' app: every answer names the code version and the
process that ran it, so a test can tell which generation served a request
on a connection it kept open.

    any path   "<APP_VERSION> gen <APPD_GENERATION> pid <pid> path <PATH_INFO> read <n>"
               (a request body is read whole; n is its length)
    /slow?s=N  sleeps N s first

`asgi` answers the same for the asgi worker (keepalive_app:asgi), so one test
can follow a connection from gthread to asgi workers and back.
"""

import asyncio
import os
import time
from urllib.parse import parse_qs

VERSION = os.environ.get("APP_VERSION", "v1")


def answer(path: str, body: bytes) -> bytes:
    text = f"{VERSION} gen {os.environ.get('APPD_GENERATION')} pid {os.getpid()} path {path} read {len(body)}\n"
    return text.encode()


def slow_seconds(query: str) -> float:
    return float(parse_qs(query).get("s", ["1"])[0])


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    if environ["PATH_INFO"] == "/slow":
        time.sleep(slow_seconds(environ.get("QUERY_STRING", "")))
    data = answer(environ["PATH_INFO"], body)
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(data)))])
    return [data]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("HTTP only")  # lifespan: unsupported
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    if scope["path"] == "/slow":
        await asyncio.sleep(slow_seconds(scope["query_string"].decode()))
    data = answer(scope["path"], body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
