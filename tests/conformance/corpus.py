"""The HTTP/1.1 conformance corpus: load the cases, send each to a server over a
fresh connection, classify what came back.

A case is a small text file under cases/<category>/:

    expect: 400|closed          what a conforming server answers (see below)
    why: RFC 9112 §3.2          where the rule comes from
    known: appd ...             optional: a difference we accept, and why

    GET / HTTP/1.1\\r\\nHost: a\\r\\n
    Host: b\\r\\n\\r\\n

After the blank line come the request bytes, written with Python bytes escapes
(\\r, \\n, \\t, \\xNN, \\\\); newlines in the file are not part of the request, so
long requests can be wrapped. `{N*text}` repeats text N times, with `$`
replaced by the repetition's index (for long lines and many fields).

expect is a comma-separated sequence of answers, one per response on the
connection; each is a |-separated set of: 2xx, 4xx, 5xx, an exact status
(400, 414, 431, 505...), or `closed` (no response, the connection ends).
"""

from __future__ import annotations

import codecs
import re
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

CASES = Path(__file__).resolve().parent / "cases"
CATEGORIES = ("framing", "smuggling", "headers", "target", "version", "trailers", "limits")
READ_TIMEOUT = 3.0
_REPEAT = re.compile(r"\{(\d+)\*([^{}]*)\}")  # innermost first: they nest
_STATUS = re.compile(rb"HTTP/1\.[01] (\d{3})[^\r\n]*\r\n")


@dataclass
class Case:
    category: str
    name: str
    expect: list[set[str]]
    why: str
    known: str
    request: bytes

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


@dataclass
class Outcome:
    statuses: list[int] = field(default_factory=list)
    closed: bool = True          # False: the server still held the connection at the timeout
    garbage: bytes = b""         # bytes that are not a well-formed response

    def describe(self) -> str:
        text = ",".join(map(str, self.statuses)) or "no response"
        if self.garbage:
            text += f" + garbage {self.garbage[:40]!r}"
        return text + ("" if self.closed else " (still open)")


def load(categories=CATEGORIES) -> list[Case]:
    cases = []
    for category in categories:
        for path in sorted((CASES / category).glob("*.txt")):
            cases.append(parse(category, path.stem, path.read_text(encoding="utf-8")))
    return cases


def parse(category: str, name: str, text: str) -> Case:
    meta, _, body = text.partition("\n\n")
    fields = dict(line.split(":", 1) for line in meta.splitlines() if line.strip())
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    source = "".join(body.splitlines())
    while _REPEAT.search(source):
        source = _REPEAT.sub(lambda m: "".join(m[2].replace("$", str(i)) for i in range(int(m[1]))),
                             source)
    request = codecs.escape_decode(source.encode("ascii"))[0]
    expect = [set(answer.split("|")) for answer in fields["expect"].split(",")]
    return Case(category, name, expect, fields.get("why", ""), fields.get("known", ""), request)


def matches(expected: set[str], status: int | None) -> bool:
    if status is None:
        return "closed" in expected
    return str(status) in expected or f"{status // 100}xx" in expected


def passed(case: Case, outcome: Outcome) -> bool:
    if outcome.garbage:
        return False
    got = outcome.statuses
    for i, answer in enumerate(case.expect):
        status = got[i] if i < len(got) else None
        if not matches(answer, status):
            return False
        if status is None:
            return True   # closed as expected: nothing may follow
    return True


def send(address: tuple[str, int], request: bytes, timeout: float = READ_TIMEOUT) -> Outcome:
    """Send the request, half-close, and read every response until the server closes."""
    with socket.create_connection(address, timeout=timeout) as sock:
        try:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # refused early and closed: what was answered is still readable
        data, closed = _read_all(sock, timeout)
    outcome = split_responses(data)
    outcome.closed = closed
    return outcome


def _read_all(sock: socket.socket, timeout: float) -> tuple[bytes, bool]:
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(65536)
        except TimeoutError:
            return b"".join(chunks), False
        except OSError:  # reset after the answer: keep what arrived
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def split_responses(data: bytes) -> Outcome:
    """Final responses in order (1xx skipped); anything unparsable is garbage."""
    outcome = Outcome()
    while data:
        match = _STATUS.match(data)
        end = data.find(b"\r\n\r\n")
        if not match or end < 0:
            outcome.garbage = data
            break
        status = int(match.group(1))
        head, data = data[:end], data[end + 4:]
        if status < 200:
            continue
        outcome.statuses.append(status)
        length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
        if re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
            data = _skip_chunked(data)
            if data is None:
                outcome.garbage = b"<bad chunked body>"
                break
        elif length:
            data = data[int(length.group(1)):]
        else:
            data = b""  # delimited by the close
    return outcome


def _skip_chunked(data: bytes) -> bytes | None:
    while True:
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return None
        try:
            size = int(data[:line_end].split(b";")[0], 16)
        except ValueError:
            return None
        data = data[line_end + 2:]
        if size == 0:
            end = data.find(b"\r\n")  # no trailers from the servers under test
            return data[end + 2:] if end >= 0 else None
        data = data[size + 2:]


def run(address: tuple[str, int], cases: list[Case]) -> dict[str, tuple[bool, Outcome]]:
    return {case.id: (passed(case, outcome := send(address, case.request)), outcome)
            for case in cases}


def table(cases: list[Case], results: dict[str, dict]) -> str:
    """Cases answered as expected per category, one column per server."""
    servers = list(results)
    rows = [["category", "cases", *servers]]
    for category in CATEGORIES + ("all",):
        ids = [c.id for c in cases if category in ("all", c.category)]
        if not ids:
            continue
        rows.append([category, str(len(ids)),
                     *(str(sum(results[s][i][0] for i in ids)) for s in servers)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def accepted_smuggling(cases: list[Case], result: dict) -> list[str]:
    """Smuggling cases a server answered 2xx to (the target is none)."""
    return [c.id for c in cases if c.category == "smuggling"
            and any(200 <= s < 300 for s in result[c.id][1].statuses)
            and not passed(c, result[c.id][1])]
