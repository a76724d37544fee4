"""The metrics listener (metrics_bind): /metrics, /livez and /readyz, served
by the daemon's own loop, never by workers, so it answers during an upgrade
and while every worker is busy.

It must never block that loop: non-blocking sockets, a request head of at
most 8 KiB, at most 16 clients at once, 5 s to send the head, and the answer
(small) written in one go with what does not fit sent as the socket drains.
"""

from __future__ import annotations

import socket
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .metrics import Collector

MAX_HEAD = 8192
MAX_CLIENTS = 16
HEAD_TIMEOUT = 5.0


def parse_bind(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


class HealthServer:
    def __init__(self, daemon, spec: str):
        self.daemon = daemon
        host, port = parse_bind(spec)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(64)
        self.sock.setblocking(False)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(Collector(daemon))
        self.clients: dict[socket.socket, list] = {}  # sock -> [received, deadline, unsent]
        self.paused = False
        daemon.loop.add_reader(self.sock, self.accept)
        daemon.loop.call_later(1.0, self.expire)

    @property
    def address(self) -> str:
        host, port = self.sock.getsockname()[:2]
        return f"{host}:{port}"

    def accept(self, mask: int) -> None:
        while True:
            if len(self.clients) >= MAX_CLIENTS:
                # Stop watching the listener (it stays readable: the loop would spin);
                # connections wait in its backlog until a client is done.
                self.daemon.loop.remove(self.sock)
                self.paused = True
                return
            try:
                conn, _ = self.sock.accept()
            except OSError:  # nothing waiting (BlockingIOError), or the peer already left
                return
            conn.setblocking(False)
            self.clients[conn] = [b"", time.monotonic() + HEAD_TIMEOUT, b""]
            self.daemon.loop.add_reader(conn, lambda m, c=conn: self.on_event(c, m))

    def on_event(self, conn: socket.socket, mask: int) -> None:
        state = self.clients.get(conn)
        if state is None:
            return
        if state[2]:
            self.flush(conn)
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        state[0] += data
        if b"\r\n\r\n" in state[0] or b"\n\n" in state[0]:
            state[2] = self.answer(state[0])
            self.flush(conn)
        elif len(state[0]) > MAX_HEAD:
            state[2] = response(431, b"request head too large\n")
            self.flush(conn)

    def answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.split(b" ", 1)[0].split(b"?", 1)[0]
        if method not in (b"GET", b"HEAD"):
            return response(405, b"GET only\n")
        if path == b"/livez":
            return response(200, b"ok\n")
        if path == b"/readyz":
            reason = self.daemon.not_ready_reason()
            return response(503, reason.encode() + b"\n") if reason else response(200, b"ready\n")
        if path == b"/metrics":
            return response(200, generate_latest(self.registry), CONTENT_TYPE_LATEST)
        return response(404, b"not found: /metrics, /livez, /readyz\n")

    def flush(self, conn: socket.socket) -> None:
        state = self.clients[conn]
        try:
            sent = conn.send(state[2])
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.close(conn)
            return
        state[2] = state[2][sent:]
        if not state[2]:
            self.close(conn)
        else:
            self.daemon.loop.set_events(conn, lambda m, c=conn: self.on_event(c, m), write=True)

    def expire(self) -> None:
        now = time.monotonic()
        for conn, state in list(self.clients.items()):
            if now > state[1] + (30.0 if state[2] else 0.0):
                self.close(conn)
        if self.sock.fileno() >= 0:
            self.daemon.loop.call_later(1.0, self.expire)

    def close(self, conn: socket.socket) -> None:
        self.daemon.loop.remove(conn)
        self.clients.pop(conn, None)
        conn.close()
        if self.paused and self.sock.fileno() >= 0:
            self.paused = False
            self.daemon.loop.add_reader(self.sock, self.accept)

    def shutdown(self) -> None:
        for conn in list(self.clients):
            self.close(conn)
        self.daemon.loop.remove(self.sock)
        self.sock.close()


def response(code: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> bytes:
    reason = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Request Header Fields Too Large",
              503: "Service Unavailable"}[code]
    head = (f"HTTP/1.1 {code} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: close\r\n\r\n")
    return head.encode() + body
