"""A Starlette WebSocket echo (and a plain HTTP route) for the asgi worker tests."""

import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocketDisconnect

VERSION = os.environ.get("APP_VERSION", "v1")


async def home(request):
    return PlainTextResponse(f"ws app {VERSION}")


async def echo(websocket):
    await websocket.accept()
    await websocket.send_text(f"hello {VERSION}")
    try:
        while True:
            text = await websocket.receive_text()
            await websocket.send_text(text)
    except WebSocketDisconnect as exc:
        marker = os.environ.get("DISCONNECT_MARKER")
        if marker:
            with open(marker, "a") as f:
                f.write(f"{exc.code}\n")


app = Starlette(routes=[Route("/", home), WebSocketRoute("/ws", echo)])
