"""A small Flask app (test dependency)."""

from flask import Flask, jsonify, request

app = Flask(__name__)


@app.get("/")
def index():
    return "hello from flask\n"


@app.post("/items")
def create_item():
    payload = request.get_json(force=True)
    return jsonify({"received": payload, "length": request.content_length}), 201
