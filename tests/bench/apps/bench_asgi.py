"""Hello-world ASGI app, the same module for appd, uvicorn, granian and
gunicorn's UvicornWorker.

    GET /       Hello, world! and the pid that answered
    POST /      the length of the body read, and the pid
    /ws         WebSocket echo (the first message is "hello PID")
"""

import os

from _marks import mark

_HEADERS = [(b"content-type", b"text/plain")]


async def app(scope, receive, send):
    kind = scope["type"]
    if kind == "http":
        await http(scope, receive, send)
    elif kind == "websocket":
        await websocket(receive, send)
    elif kind == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                mark("ready")
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return


async def http(scope, receive, send):
    length = 0
    if scope["method"] == "POST":
        more = True
        while more:
            message = await receive()
            length += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = f"read {length} pid {os.getpid()}\n".encode()
    else:
        body = f"Hello, world! pid {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": _HEADERS + [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def websocket(receive, send):
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    await send({"type": "websocket.send", "text": f"hello {os.getpid()}"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})
