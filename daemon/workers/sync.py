"""The sync worker: one connection at a time, `Connection: close`, accepting
directly on the shared listeners (the kernel spreads connections)."""

from __future__ import annotations

import errno
import selectors
import socket
import time

from ..http import ServerInfo, handle_connection
from ..http.proxy import connection_setup
from ..access import RequestLog
from .base import Worker

_ACCEPT_ERRORS = (errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR)


def server_info(listener, cfg: dict, multithread: bool = False) -> ServerInfo:
    address = listener.address
    if address.startswith("unix:"):
        name, port = address[5:], ""
    else:
        name, _, port = address.rpartition(":")
        name = name.strip("[]")
    return ServerInfo(server_name=name, server_port=port,
                      limit_request_line=cfg.limit_request_line,
                      limit_request_fields=cfg.limit_request_fields,
                      limit_request_field_size=cfg.limit_request_field_size,
                      header_timeout=cfg.header_timeout,
                      multithread=multithread, setup=connection_setup(listener, cfg))


class Acceptor:
    """listener.accept() for the per-connection hot path: socket.accept() turns the
    family and type into IntEnums on every call. The new socket is blocking
    (accept4 without SOCK_NONBLOCK, no default timeout) as socket.accept() makes it
    from a non-blocking listener."""

    __slots__ = ("sock", "_accept", "family", "type", "proto")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._accept = sock._accept
        self.family, self.type, self.proto = int(sock.family), int(sock.type), sock.proto

    def accept(self) -> tuple[socket.socket, object]:
        fd, addr = self._accept()
        return socket.socket(self.family, self.type, self.proto, fd), addr


class SyncWorker(Worker):
    busy_since: float | None = None

    def load_now(self) -> tuple:
        if self.busy_since is None:
            return 0, 0.0
        return 1, time.monotonic() - self.busy_since
    def serve(self) -> None:
        sockets = [(Acceptor(l.sock), server_info(l, self.cfg)) for l in self.listeners]
        selector = selectors.DefaultSelector()
        for acceptor, _ in sockets:
            selector.register(acceptor.sock, selectors.EVENT_READ)
        selector.register(self.wake_r, selectors.EVENT_READ)
        selector.register(self.reporter.sock, selectors.EVENT_READ)  # PAUSE wakes an idle worker
        access_log = RequestLog(self)
        access_log = access_log if access_log else None  # asked once, not per request
        app = self.app
        while self.alive:
            if self.paused:
                self.stand_by()
                continue
            served = 0
            for sock, info in sockets:
                if not self.alive or self.paused:
                    break
                served += self.accept_one(sock, info, app, access_log)
            if served:
                self.heartbeat()
                continue
            if not self.master_alive():
                self.log.warning("master_gone", detail="stopping")
                break
            self.heartbeat()
            if any(key.fileobj is self.reporter.sock
                   for key, _ in self.wait_readable(selector, self.until_next_heartbeat())):
                self.check_orders()
        if self.sweep:
            self.sweep_backlog(sockets, app, access_log)
        selector.close()

    def accept_one(self, sock, info, app, access_log) -> int:
        try:
            conn, addr = sock.accept()  # an Acceptor
        except OSError as exc:
            if exc.errno in _ACCEPT_ERRORS:
                return 0
            pause = self.accept_failed(exc)
            if pause is None:
                raise
            time.sleep(pause)  # one connection at a time: nothing else to do meanwhile
            return 0
        # accept() gives a blocking socket (accept4 without SOCK_NONBLOCK): no setblocking call.
        self.report_busy()
        self.busy_since = time.monotonic()
        try:
            # The heartbeat goes on while a slow client sends its head or body, so
            # such a client meets header_timeout (408), not the master's timeout.
            handle_connection(conn, addr, app, info, access_log, on_wait=self.heartbeat)
        finally:
            conn.close()
            self.busy_since = None
        self.count_request()
        return 1

    def sweep_backlog(self, sockets, app, access_log) -> None:
        """On drain: serve the connections already queued, bounded by graceful_timeout."""
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while time.monotonic() < deadline:
            served = sum(self.accept_one(sock, info, app, access_log) for sock, info in sockets)
            if not served:
                return
