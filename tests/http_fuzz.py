"""Hypothesis strategies and checks for fuzzing a real running appd's request
path (tests/test_conformance.py, a few dozen examples; tests/chaos, thousands).

Requests are sent in pieces split at random points, with a pause between
pieces so the server sees them in separate recv calls. Valid requests must be
answered exactly as if sent whole; mangled ones must get a well-formed
response or a close."""

from __future__ import annotations

import socket
import time

from hypothesis import strategies as st

import conformance.corpus as corpus
from http_harness import read_until_close

PAUSE = 0.004   # between pieces: long enough for a separate recv on loopback

_TCHAR = "!#$%&'*+-.^`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_RESERVED = {"host", "content-length", "transfer-encoding", "connection", "expect", "te",
             "trailer", "upgrade", "keep-alive"}

methods = st.sampled_from([b"GET", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"BREW",
                           b"PROPFIND", b"X-CUSTOM", b"get"])
_segment = st.lists(st.sampled_from(["a", "Z", "0", "-", ".", "_", "~", "%20", "é", "✓"]),
                    max_size=12).map(lambda parts: "".join(parts).encode("utf-8"))
targets = st.builds(lambda parts, query: b"/" + b"/".join(parts) + (b"?" + query if query else b""),
                    st.lists(_segment, max_size=4), st.one_of(st.just(b""), _segment))
field_names = st.text(alphabet=_TCHAR, min_size=1, max_size=20).filter(
    lambda n: n.lower() not in _RESERVED).map(str.encode)
field_values = st.binary(max_size=60).map(
    lambda b: bytes(c for c in b if c == 9 or 32 <= c < 127 or c >= 128).strip(b" \t"))
fields = st.lists(st.tuples(field_names, field_values), max_size=12)
bodies = st.binary(max_size=3000)
chunk_exts = st.sampled_from([b"", b";a=b", b";flag", b";q=\"x y\"", b" ;a"])


@st.composite
def valid_requests(draw) -> tuple[bytes, int]:
    """(request bytes, body length): a request every conforming server serves."""
    method, target = draw(methods), draw(targets)
    head = [method + b" " + target + b" HTTP/1.1", b"Host: fuzz.example:80"]
    head += [name + b": " + value for name, value in draw(fields)]
    body = draw(bodies) if method not in (b"GET", b"OPTIONS") else b""
    if body and draw(st.booleans()):
        head.append(b"Transfer-Encoding: chunked")
        payload = _chunked(draw, body)
    else:
        head.append(b"Content-Length: %d" % len(body))
        payload = body
    return b"\r\n".join(head) + b"\r\n\r\n" + payload, len(body)


def _chunked(draw, body: bytes) -> bytes:
    out, rest = [], body
    while rest:
        size = draw(st.integers(1, max(1, len(rest))))
        out.append(b"%x%s\r\n%s\r\n" % (size, draw(chunk_exts), rest[:size]))
        rest = rest[size:]
    trailers = b"".join(b"X-" + n + b": " + v + b"\r\n" for n, v in draw(st.lists(
        st.tuples(field_names, field_values), max_size=2)))
    return b"".join(out) + b"0\r\n" + trailers + b"\r\n"


@st.composite
def mangled_requests(draw) -> bytes:
    """A valid request with a few bytes replaced, inserted or cut."""
    data = bytearray(draw(valid_requests())[0])
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        action = draw(st.sampled_from(["replace", "insert", "delete"]))
        byte = draw(st.sampled_from([0, 9, 10, 13, 32, 34, 44, 58, 59, 127, 128, 255]) | st.integers(0, 255))
        if action == "insert" or at == len(data):
            data[at:at] = bytes([byte])
        elif action == "replace":
            data[at] = byte
        else:
            del data[at]
    return bytes(data)


split_fractions = st.lists(st.floats(0.0, 1.0), max_size=4)


def pieces(data: bytes, fractions: list[float]) -> list[bytes]:
    cuts = sorted({int(f * len(data)) for f in fractions} - {0, len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def exchange(address: tuple[str, int], parts: list[bytes], timeout: float = 15.0) -> bytes:
    """Send the parts with pauses, half-close, read until the server closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for i, part in enumerate(parts):
                if i:
                    time.sleep(PAUSE)
                sock.sendall(part)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused and closed early: what was answered is still readable
        return read_until_close(sock, reset_ok=True)


def check_valid(answer: bytes, body_length: int) -> None:
    outcome = corpus.split_responses(answer)
    assert not outcome.garbage and outcome.statuses == [200], answer[:300]
    assert b" body=%d\n" % body_length in answer, answer[-200:]


def check_sane(answer: bytes) -> None:
    outcome = corpus.split_responses(answer)
    assert not outcome.garbage, answer[:300]
    assert all(s in (200, 400, 408, 414, 431, 505) for s in outcome.statuses), outcome.statuses
