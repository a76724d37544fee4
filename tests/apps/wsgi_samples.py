"""Small WSGI applications that exercise the HTTP layer (tests/test_http.py).

`router` dispatches on the first path segment; every app is plain PEP 3333
so it can be wrapped with wsgiref.validate.validator.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys

CHUNK = 64 * 1024
_BLOCK = b"x" * CHUNK


def _reply(start_response, body: bytes, status="200 OK", ctype="text/plain"):
    start_response(status, [("Content-Type", ctype)])
    return [body]


def hello(environ, start_response):
    body = b"Hello, world!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def hello_unsized(environ, start_response):
    """No Content-Length: the server adds one for a list of one bytes object."""
    return _reply(start_response, b"Hello, world!\n")


def _read_body(environ) -> bytes:
    """Read the whole body with read(n) only (the validator forbids read())."""
    stream = environ["wsgi.input"]
    if environ.get("CONTENT_LENGTH"):
        return stream.read(int(environ["CONTENT_LENGTH"]))
    parts = []
    while chunk := stream.read(CHUNK):
        parts.append(chunk)
    return b"".join(parts)


def echo(environ, start_response):
    """Reads the body; answers its length and sha256 as JSON."""
    body = _read_body(environ)
    info = {"method": environ["REQUEST_METHOD"], "length": len(body),
            "sha256": hashlib.sha256(body).hexdigest()}
    return _reply(start_response, json.dumps(info).encode(), ctype="application/json")


def env(environ, start_response):
    """The string-valued part of the environ, plus a few wsgi.* values, as JSON."""
    out = {k: v for k, v in environ.items() if isinstance(v, str)}
    for key in ("wsgi.version", "wsgi.multithread", "wsgi.multiprocess", "wsgi.run_once",
                "wsgi.input_terminated", "wsgi.url_scheme"):
        out[key] = environ[key]
    out["errors_is_stderr"] = environ["wsgi.errors"] is sys.stderr
    out["has_file_wrapper"] = callable(environ.get("wsgi.file_wrapper"))
    return _reply(start_response, json.dumps(out).encode(), ctype="application/json")


def lines(environ, start_response):
    """Reads the body with readline(), readline(n), readlines() and iteration."""
    stream = environ["wsgi.input"]
    first = stream.readline()
    partial = stream.readline(3)
    second_rest = stream.readline()
    some = stream.readlines(1)
    rest = list(stream)
    out = {"first": first.decode(), "partial": partial.decode(),
           "second_rest": second_rest.decode(), "some": [x.decode() for x in some],
           "rest": [x.decode() for x in rest]}
    return _reply(start_response, json.dumps(out).encode(), ctype="application/json")


def ignore_body(environ, start_response):
    """Never touches wsgi.input (no 100 Continue must be sent)."""
    return _reply(start_response, b"ignored\n")


def stream(environ, start_response):
    """/stream/<bytes>: a generator of 64 KiB chunks, no Content-Length."""
    total = int(environ["PATH_INFO"].split("/")[2])
    start_response("200 OK", [("Content-Type", "application/octet-stream")])

    def gen():
        left = total
        while left > 0:
            yield _BLOCK if left >= CHUNK else _BLOCK[:left]
            left -= CHUNK
    return gen()


def write_callable(environ, start_response):
    """Uses the legacy write() callable, then returns more body."""
    write = start_response("200 OK", [("Content-Type", "text/plain")])
    write(b"one,")
    write(b"two,")
    return [b"three"]


def crash(environ, start_response):
    raise RuntimeError("boom before the response")


def crash_late(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])

    def gen():
        yield b"partial"
        raise RuntimeError("boom after the response started")
    return gen()


def exc_info_page(environ, start_response):
    """Starts a 200, fails, then replaces it with a 503 via exc_info (PEP 3333)."""
    start_response("200 OK", [("Content-Type", "text/plain")])
    try:
        raise ValueError("backend down")
    except ValueError:
        start_response("503 Service Unavailable", [("Content-Type", "text/plain")],
                       sys.exc_info())
    return [b"sorry\n"]


def no_content(environ, start_response):
    start_response("204 No Content", [])
    return []


def file_bytesio(environ, start_response):
    """A file_wrapper over an object with no real fileno: iterated, not sendfile'd."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return environ["wsgi.file_wrapper"](io.BytesIO(b"0123456789" * 10000), 4096)


def make_file_app(path: str, content_length: int | None = None):
    """Serves `path` through wsgi.file_wrapper (sendfile when the server can)."""
    def file_app(environ, start_response):
        headers = [("Content-Type", "application/octet-stream")]
        if content_length is not None:
            headers.append(("Content-Length", str(content_length)))
        start_response("200 OK", headers)
        return environ["wsgi.file_wrapper"](open(path, "rb"))
    return file_app


def not_found(environ, start_response):
    return _reply(start_response, b"not found\n", status="404 Not Found")


ROUTES = {
    "": hello, "hello": hello, "echo": echo, "env": env, "lines": lines,
    "ignore": ignore_body, "stream": stream, "write": write_callable, "crash": crash,
    "crash_late": crash_late, "exc_info": exc_info_page, "nocontent": no_content,
    "bytesio": file_bytesio,
}


def router(environ, start_response):
    first = environ["PATH_INFO"].split("/")[1] if environ["PATH_INFO"] else ""
    return ROUTES.get(first, not_found)(environ, start_response)


def make_flask_app():
    """A Flask app with a GET and a JSON POST route (flask is a test dependency)."""
    from flask import Flask, jsonify, request

    app = Flask("appd_sample")

    @app.get("/items/<int:item_id>")
    def get_item(item_id):
        return jsonify(id=item_id, q=request.args.get("q"))

    @app.post("/items")
    def create_item():
        data = request.get_json()
        return jsonify(created=data, n=len(data["tags"])), 201

    return app
