"""A FastAPI app for the asgi worker tests: JSON, a streaming response, a file
upload, a dependency reading lifespan state. FAIL_STARTUP=1 makes the lifespan
startup fail with a message."""

import asyncio
import hashlib
import os
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, UploadFile
from fastapi.responses import StreamingResponse

VERSION = os.environ.get("APP_VERSION", "v1")


@asynccontextmanager
async def lifespan(app):
    if os.environ.get("FAIL_STARTUP"):
        raise RuntimeError("database unreachable (FAIL_STARTUP is set)")
    yield {"greeting": f"hello from {VERSION}", "started_pid": os.getpid()}
    marker = os.environ.get("SHUTDOWN_MARKER")
    if marker:
        with open(marker, "a") as f:
            f.write(f"{os.getpid()}\n")


app = FastAPI(lifespan=lifespan)


def greeting(request: Request) -> str:
    return request.state.greeting


@app.get("/")
async def root():
    return {"version": VERSION, "pid": os.getpid()}


@app.get("/healthz")
async def healthz():
    return {"ok": True}


@app.get("/state")
async def state(greeting: str = Depends(greeting)):
    return {"greeting": greeting}


@app.post("/echo")
async def echo(request: Request):
    body = await request.body()
    return {"length": len(body), "version": VERSION}


@app.post("/upload")
async def upload(file: UploadFile):
    data = await file.read()
    return {"name": file.filename, "size": len(data), "md5": hashlib.md5(data).hexdigest()}


@app.get("/stream")
async def stream(parts: int = 5, size: int = 10):
    async def generate():
        for i in range(parts):
            yield (str(i % 10) * size).encode()
            await asyncio.sleep(0)
    return StreamingResponse(generate(), media_type="text/plain")


@app.get("/hold")
async def hold(path: str):
    """Answer once the file at `path` exists (at most 30 s)."""
    for _ in range(1500):
        if os.path.exists(path):
            break
        await asyncio.sleep(0.02)
    return {"held": True, "version": VERSION}


@app.get("/sleep")
async def sleep(seconds: float = 1.0):
    await asyncio.sleep(seconds)
    return {"slept": seconds, "version": VERSION}
