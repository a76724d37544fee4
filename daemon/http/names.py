"""Request names as the environ wants them: header names as environ keys, the
target as PATH_INFO and QUERY_STRING. Both cached: clients repeat themselves."""

from __future__ import annotations

from urllib.parse import unquote_to_bytes

import httptools

# Header name (raw bytes, as sent) -> environ key, or None to drop the field.
# Bounded so a client inventing names cannot grow it without end.
_HEADER_KEYS: dict[bytes, str | None] = {}
_HEADER_KEYS_MAX = 1024


def header_key(name: bytes) -> str | None:
    """Environ key for a header name; None for names with '_', which would
    collide with their '-' twin (X_User vs X-User spoofing, as gunicorn)."""
    key = _HEADER_KEYS.get(name, False)
    if key is not False:
        return key
    text = name.decode("latin-1").upper()
    if "_" in text:
        key = None
    elif text in ("CONTENT-TYPE", "CONTENT-LENGTH"):
        key = text.replace("-", "_")
    else:
        key = "HTTP_" + text.replace("-", "_")
    if len(_HEADER_KEYS) < _HEADER_KEYS_MAX:
        _HEADER_KEYS[name] = key
    return key


# Bytes searched for as ints: CPython 3.11 tries `b"#" in url` as an int first, and
# raises and clears a TypeError every time (thousands of instructions a request).
_HASH, _PERCENT, _QUERY = ord("#"), ord("%"), ord("?")


def split_target(url: bytes) -> tuple[str, str]:
    """PATH_INFO (percent-decoded, latin-1) and QUERY_STRING of a request target."""
    if url[:1] == b"/":
        if _QUERY not in url and _HASH not in url and _PERCENT not in url:
            return url.decode("latin-1"), ""  # the usual target: a plain path
        path, _, query = url.partition(b"?")
        if _HASH in url:
            path, _, query = url.partition(b"#")[0].partition(b"?")
    elif url == b"*":
        return "", ""
    else:  # absolute-form (proxies) or authority-form (CONNECT)
        try:
            parsed = httptools.parse_url(url)
            path, query = parsed.path or b"/", parsed.query or b""
        except httptools.HttpParserInvalidURLError:
            return "", ""
    if _PERCENT in path:
        path = unquote_to_bytes(path)
    return path.decode("latin-1"), query.decode("latin-1")
