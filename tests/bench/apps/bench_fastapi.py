"""A FastAPI JSON endpoint for the ASGI throughput figures."""

import os

from fastapi import FastAPI

from _marks import mark

app = FastAPI()


@app.get("/")
async def root():
    return {"message": "Hello, world!", "pid": os.getpid()}


mark("ready")
