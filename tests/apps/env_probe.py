"""Answers with the value of APPD_TEST_MARK in the worker's environment (or "-")."""

import os


def app(environ, start_response):
    body = os.environ.get("APPD_TEST_MARK", "-").encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
