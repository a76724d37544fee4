"""Request checks RFC 9110/9112 require beyond what llhttp already enforces,
and the two places where llhttp is stricter than real clients need.

llhttp (through httptools) already refuses: field names that are not tokens,
CTLs other than HTAB in field values, bare CR/LF, obs-fold, Content-Length
with Transfer-Encoding, duplicate Content-Length, a Transfer-Encoding that
does not end in chunked, malformed chunk sizes. What is left is checked here,
only on what the parser callbacks hand over, so the common request pays for a
dict lookup or two.
"""

from __future__ import annotations

import re

from .errors import AppError, BadRequest, VersionNotSupported

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request-target never holds CTLs, SP or DEL (RFC 9112 §3.2); bytes >= 0x80
# are not allowed either, but browsers and curl send UTF-8 paths as is.
_BAD_TARGET_BYTE = re.compile(rb"[\x00-\x20\x7f]")
_HIGH_BYTE = re.compile(rb"[\x80-\xff]")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])").fullmatch

# RFC 3986 host (IP-literal, IPv4 or reg-name) and port, as in Host and in
# the authority of absolute-form and authority-form targets.
_HOST = r"(?:\[[0-9A-Fa-f:.]+(?:%25[0-9A-Za-z._~%-]+)?\]|[A-Za-z0-9\-._~%!$&'()*+,;=]*)"
_HOST_FIELD = re.compile(_HOST + r"(?::[0-9]*)?").fullmatch
_AUTHORITY_FORM = re.compile((r"(?!:)" + _HOST + r":[0-9]+").encode()).fullmatch
_ABSOLUTE_FORM = re.compile((r"([A-Za-z][A-Za-z0-9+.\-]*)://(" + _HOST + r")(?::[0-9]*)?"
                             r"(?:[/?#][\x21-\xff]*)?").encode()).fullmatch

# RFC 9110 §6.5.1: fields a sender must not put in trailers (framing, routing,
# request modifiers, authentication, content processing), plus the
# connection-specific ones. As environ keys (see request.header_key).
FORBIDDEN_TRAILERS = frozenset(
    ["CONTENT_LENGTH", "CONTENT_TYPE"]
    + ["HTTP_" + name.upper().replace("-", "_") for name in (
        "Transfer-Encoding", "Trailer", "TE", "Host", "Authorization", "Proxy-Authorization",
        "Cache-Control", "Expect", "Max-Forwards", "Pragma", "Range", "If-Match",
        "If-None-Match", "If-Modified-Since", "If-Unmodified-Since", "If-Range",
        "Content-Encoding", "Content-Range", "Connection", "Keep-Alive", "Upgrade",
        "Proxy-Connection", "Set-Cookie")])


# -- the response side (PEP 3333, RFC 9110) -------------------------------------

# RFC 9110 §7.6.1 connection-specific fields: the server frames the response.
HOP_BY_HOP = frozenset(("connection", "keep-alive", "proxy-connection", "te", "trailer",
                        "transfer-encoding", "upgrade"))
_STR_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+").fullmatch
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]").search


def check_field_name(name) -> str:
    """The lower-case form of a response header name the app sent, once checked."""
    if type(name) is not str:
        raise AppError(f"header name {name!r} is {type(name).__name__}, not str (PEP 3333)")
    if not _STR_TOKEN(name):
        raise AppError(f"header name {name!r} is not a token")
    return name.lower()


def check_field_value(name: str, value) -> None:
    """A response header value must be a str without CTLs but HTAB (RFC 9110 §5.5)."""
    if type(value) is not str:
        raise AppError(f"header {name!r} has a {type(value).__name__} value, not str (PEP 3333)")
    if _BAD_VALUE(value):
        raise AppError(f"header {name!r} value {value!r} contains a control character")


# -- the request side -------------------------------------------------------------

def check_host(value: str) -> None:
    """RFC 9112 §3.2: a Host that is not uri-host [":" port] gets a 400."""
    if not _HOST_FIELD(value):
        raise BadRequest("invalid Host header")


def check_target(method: str, url: bytes) -> None:
    """The request-target form must fit the method (RFC 9112 §3.2.1-3.2.4).

    Called for every request; origin-form (the usual "/path") costs one compare."""
    if url[:1] == b"/":
        if method == "CONNECT":
            raise BadRequest("CONNECT needs an authority-form target (host:port)")
        return
    if url == b"*":
        if method != "OPTIONS":
            raise BadRequest("asterisk-form target is only for OPTIONS")
        return
    if method == "CONNECT":
        if not _AUTHORITY_FORM(url):
            raise BadRequest("invalid authority-form target")
        return
    match = _ABSOLUTE_FORM(url)
    if match is None:
        raise BadRequest("invalid request target")
    # RFC 9110 §4.2.1: an http(s) URI with an empty host must be rejected.
    if match.group(1).lower() in (b"http", b"https") and not match.group(2):
        raise BadRequest("absolute-form target with an empty host")


def relax_request_line(line: bytes, keep_method: bool) -> tuple[bytes, str, bytes]:
    """A request line llhttp refused only for being stricter than RFC 9112, made
    acceptable to it: an extension method (any token; llhttp knows a fixed list)
    is replaced by GET, raw bytes >= 0x80 in the target are percent-encoded, a
    later HTTP/1 minor version becomes 1.1 (RFC 9110 §2.5). Returns (the line
    to parse, the method sent, the target sent); raises BadRequest when the line
    is invalid for the RFC too, VersionNotSupported for HTTP/3 and up.

    Why not lenient flags: llhttp has none for methods or target bytes, and
    its lenient_version would cost every connection a call for a rare case."""
    parts = line.split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("invalid method")
    if not target or _BAD_TARGET_BYTE.search(target):
        raise BadRequest("invalid character in request target")
    match = _VERSION(version)
    if match is None:
        raise BadRequest("malformed HTTP version")
    if match[1] != b"1":
        raise VersionNotSupported(f"{version.decode()} on an HTTP/1 connection")
    escaped = _HIGH_BYTE.sub(lambda m: b"%%%02X" % m[0][0], target)
    parsed_method = method if keep_method else b"GET"
    return parsed_method + b" " + escaped + b" HTTP/1." + min(match[2], b"1"), \
        method.decode("latin-1"), target
