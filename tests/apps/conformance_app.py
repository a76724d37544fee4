"""The application behind the conformance corpus (tests/conformance): reads the
whole body and answers 200 naming the method, the target and the body length,
so a case sees whether the request reached the app and how it was framed."""


def app(environ, start_response):
    body = environ["wsgi.input"].read()
    text = (f"{environ['REQUEST_METHOD']} {environ.get('RAW_URI', environ['PATH_INFO'])} "
            f"body={len(body)}\n").encode("latin-1", "replace")
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(text)))])
    return [text]
