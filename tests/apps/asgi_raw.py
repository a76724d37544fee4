"""A bare ASGI 3 app (no framework, no lifespan support) for the asgi worker's
HTTP tests: an endless stream for backpressure, a route that waits for
http.disconnect."""

import asyncio
import os
import time


def block_the_event_loop():
    time.sleep(60)  # wrong on purpose: blocks the worker's event loop


async def app(scope, receive, send):
    if scope["type"] != "http":
        raise ValueError("HTTP only")  # lifespan: unsupported, like Django
    path = scope["path"]
    if path == "/infinite":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        chunk = b"x" * 65536
        while True:  # until the client is gone; send() waits while it does not read
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await asyncio.sleep(0)
    if path == "/block":
        block_the_event_loop()
    if path == "/wait-disconnect":
        while (await receive())["type"] != "http.disconnect":
            pass
        with open(os.environ["DISCONNECT_MARKER"], "a") as f:
            f.write("disconnect\n")
        return
    body = f"raw {os.environ.get('APP_VERSION', 'v1')} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def create_app():
    """An app factory (appd start asgi_raw:create_app --factory)."""
    return app
