"""The notify protocol between a worker and its master: systemd's sd_notify
format (newline-separated KEY=VALUE in one datagram), so a program of any
language that speaks sd_notify can be a worker.

Keys: READY=1, WATCHDOG=1 (heartbeat), STATUS=..., and appd's own
X_APPD_REQUESTS=n, X_APPD_BUSY=n and X_APPD_REQUEST_AGE=s (requests in
progress, the oldest one's age), X_APPD_BOOT_ERROR=<text to the end>.
The master answers a booting generation's workers with SERVE=1 at cutover,
and sends HANDOFF=1 just before a graceful stop signal when the serving
workers take this worker's idle connections (appd.handoff), and PAUSE=1 /
PAUSE=handoff / PAUSE=0 to stand the worker by and resume it (probation);
the worker acknowledges with X_APPD_PAUSED=1 / 0.
"""

from __future__ import annotations

import socket

from ..messages import PAUSE_KEY, PAUSED_HANDING_OFF, PAUSED_REPORT, RESUMED, SERVE

BOOT_ERROR = "X_APPD_BOOT_ERROR="
_SERVE_KEY, _, _SERVE_VALUE = SERVE.partition("=")


def parse(datagram: bytes) -> dict[str, str]:
    text = datagram.decode("utf-8", errors="replace")
    if text.startswith(BOOT_ERROR):
        return {"X_APPD_BOOT_ERROR": text[len(BOOT_ERROR):]}
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            fields[key] = value
    return fields


class Reporter:
    """The worker's side: best-effort sends that never block the worker."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received: dict[str, str] = {}  # the master's fields, latest value of each
        sock.setblocking(False)

    def send(self, text: str) -> None:
        try:
            self.sock.send(text.encode("utf-8", errors="replace"))
        except OSError:
            pass  # the master is gone or busy; the worker notices its parent separately

    def ready(self) -> None:
        self.send("READY=1")

    def heartbeat(self, requests: int, busy: int | None = None, request_age: float | None = None) -> None:
        text = f"WATCHDOG=1\nX_APPD_REQUESTS={requests}"
        if busy is not None:
            text += f"\nX_APPD_BUSY={busy}\nX_APPD_REQUEST_AGE={request_age:.3f}"
        self.send(text)

    def read(self) -> dict[str, str]:
        """Take the master's pending datagrams; every field it ever sent, latest value."""
        try:
            while True:
                self.received.update(parse(self.sock.recv(4096)))
        except OSError:
            return self.received

    def told_to_serve(self) -> bool:
        """True once the master sent SERVE=1."""
        return self.read().get(_SERVE_KEY) == _SERVE_VALUE

    def orders(self) -> dict[str, str]:
        """Every field the master sent (e.g. HANDOFF=1 before a stop)."""
        return self.read()

    @property
    def paused(self) -> bool:
        """Told to stand by (as last read): accept nothing until PAUSE=0."""
        return self.received.get(PAUSE_KEY, RESUMED) != RESUMED

    @property
    def pause_hands_off(self) -> bool:
        """Paused, and the serving generation takes this worker's idle connections."""
        return self.received.get(PAUSE_KEY) == PAUSED_HANDING_OFF

    def paused_now(self, paused: bool) -> None:
        self.send(f"{PAUSED_REPORT}={int(paused)}")

    def boot_error(self, text: str) -> None:
        self.send(BOOT_ERROR + text[-60000:])
