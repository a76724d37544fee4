"""A small Flask app, the same module for appd and gunicorn.

    /             hello from flask, with the pid that answered
    /sleep?s=N    marks the worker busy, sleeps N seconds, answers
    /items (POST) echoes a JSON body
"""

import os
import time

from flask import Flask, jsonify, request

from _marks import mark

app = Flask(__name__)


@app.get("/")
def index():
    return f"Hello from flask, pid {os.getpid()}\n"


@app.get("/sleep")
def sleep():
    mark("busy")
    time.sleep(min(float(request.args.get("s", "1")), 30.0))
    return f"slept in pid {os.getpid()}\n"


@app.post("/items")
def create_item():
    return jsonify({"received": request.get_json(force=True)}), 201


mark("ready")
