"""Errors of the HTTP layer and the canned responses that answer them."""

from __future__ import annotations


class HTTPError(Exception):
    """A request we refuse; answered with `status` and the connection closed."""

    status = "400 Bad Request"


class BadRequest(HTTPError):
    status = "400 Bad Request"


class URITooLong(HTTPError):
    status = "414 URI Too Long"


class HeadersTooLarge(HTTPError):
    status = "431 Request Header Fields Too Large"


class RequestTimeout(HTTPError):
    status = "408 Request Timeout"


class VersionNotSupported(HTTPError):
    status = "505 HTTP Version Not Supported"


class AppError(Exception):
    """The application broke PEP 3333 (a str body, a hop-by-hop header, a bad
    Content-Length...): answered 500 and logged as one line naming the mistake."""


class ClientDisconnected(OSError):
    """The client went away (reset, EOF, timeout) mid-request or mid-response.

    An OSError so that applications treating wsgi.input like a file see the
    kind of error they expect from a file."""


def error_response(status: str, date_line: str) -> bytes:
    """A complete, tiny text/plain response that closes the connection."""
    body = status[4:].encode("latin-1") + b"\n"
    head = (
        f"HTTP/1.1 {status}\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        f"{date_line}"
        "Server: appd\r\n\r\n"
    )
    return head.encode("latin-1") + body
