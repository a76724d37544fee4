"""The connection handoff channel: how a stopping worker passes its idle
kept-alive client connections to the serving generation instead of closing
them under the client.

The daemon creates one Unix SOCK_SEQPACKET socket pair at start and holds it
for the whole life of the service (across generations and daemon re-execs),
exactly as it holds the listeners. Every generation inherits both ends,
named by APPD_HANDOFF_FD=<send end>,<receive end>. A stopping worker sends
one message per connection into the send end: the connection's fd
(SCM_RIGHTS) plus the bytes already read from it (part of a request head);
a serving worker receives from the other end and treats the connection as
accepted. The kernel delivers each message to exactly one receiver, so a
connection is never served by two workers.

Sends never block (MSG_DONTWAIT): a full channel says no, and the sender
falls back to serving the connection's next request itself with
`Connection: close`.
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass

import msgpack

ENV = "APPD_HANDOFF_FD"
MAX_DATA = 48 * 1024          # bytes already read that may travel with a connection
_RECV_SIZE = MAX_DATA + 1024  # a message never exceeds this (MAX_DATA + the listener name)
_MAX_FDS = 4                  # room for stray fds, which are closed
_SNDBUF = 1024 * 1024         # queue room for a few thousand connections in flight
# Worker classes whose workers take handed-off connections.
TAKING_CLASSES = frozenset({"gthread", "asgi"})


def takes_handoff(worker_class: str) -> bool:
    return worker_class in TAKING_CLASSES


def inherited_fds(environ=os.environ) -> tuple[int, int]:
    """(send end, receive end) named by APPD_HANDOFF_FD; ValueError if absent or malformed."""
    send_fd, recv_fd = (int(fd) for fd in environ.get(ENV, "").split(","))
    return send_fd, recv_fd


def close_on_exec(environ=os.environ) -> None:
    """A master keeps the channel for its forked workers, not for programs they exec."""
    try:
        for fd in inherited_fds(environ):
            os.set_inheritable(fd, False)
    except (ValueError, OSError):
        pass


@dataclass
class Handed:
    """One connection taken from the channel."""

    sock: socket.socket
    data: bytes        # already read by the previous worker: the start of the next request
    listener: str      # name of the listener it was accepted on
    peer: tuple = ()   # the client's address (a handed connection whose client left is dropped)


class Channel:
    def __init__(self, send_sock: socket.socket, recv_sock: socket.socket):
        self.send_sock = send_sock
        self.recv_sock = recv_sock

    # --- the daemon's side: create, pass on, carry across re-exec ---

    @classmethod
    def create(cls) -> "Channel":
        send_sock, recv_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            send_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, _SNDBUF)
        except OSError:
            pass  # the kernel's default is enough to be useful
        channel = cls(send_sock, recv_sock)
        channel.share()
        return channel

    @classmethod
    def adopt(cls, fds) -> "Channel":
        send_fd, recv_fd = fds
        channel = cls(socket.socket(fileno=send_fd), socket.socket(fileno=recv_fd))
        channel.share()
        return channel

    @classmethod
    def from_env(cls, environ=os.environ) -> "Channel | None":
        """The channel a generation inherited, or None (started without one)."""
        try:
            return cls.adopt(inherited_fds(environ))
        except (ValueError, OSError):
            return None

    def share(self) -> None:
        """Non-blocking for everyone, inherited by the generations the daemon starts."""
        for sock in (self.send_sock, self.recv_sock):
            sock.setblocking(False)
            os.set_inheritable(sock.fileno(), True)

    def fds(self) -> list[int]:
        return [self.send_sock.fileno(), self.recv_sock.fileno()]

    def env(self) -> dict[str, str]:
        return {ENV: ",".join(str(fd) for fd in self.fds())}

    def close(self) -> None:
        self.send_sock.close()
        self.recv_sock.close()

    # --- the workers' side ---

    def fileno(self) -> int:
        """Readable when a connection waits to be taken (for a selector)."""
        return self.recv_sock.fileno()

    def send(self, conn: socket.socket, data: bytes, listener: str) -> bool:
        """Pass `conn` on; True if it is now the channel's (close our copy then).
        False when it cannot go (channel full, data too long): keep serving it."""
        if len(data) > MAX_DATA:
            return False
        payload = msgpack.packb({"v": 1, "listener": listener, "data": bytes(data)}, use_bin_type=True)
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [conn.fileno()]))]
        try:
            self.send_sock.sendmsg([payload], rights, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
        except OSError:  # EAGAIN (full), ENOBUFS, ETOOMANYREFS: the sender keeps it
            return False
        return True

    def receive(self, limit: int) -> list[Handed]:
        """Up to `limit` connections waiting in the channel (none if empty), each with its
        client's address; connections whose client has gone are closed, not returned."""
        taken = []
        while len(taken) < limit:
            try:
                payload, ancillary, flags, _ = self.recv_sock.recvmsg(
                    _RECV_SIZE, socket.CMSG_SPACE(_MAX_FDS * 4),
                    socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                break
            handed = _decode(payload, _fds_of(ancillary), flags)
            if handed is not None:
                taken.append(handed)
        return taken


def _fds_of(ancillary) -> list[int]:
    fds = array.array("i")
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    return list(fds)


def _decode(payload: bytes, fds: list[int], flags: int) -> Handed | None:
    """The connection of one message; anything malformed is closed, never leaked."""
    message = None
    if len(fds) == 1 and not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        try:
            message = msgpack.unpackb(payload, raw=False)
        except Exception:  # not ours: drop it
            message = None
    if not isinstance(message, dict) or not isinstance(message.get("data"), bytes):
        for fd in fds:
            os.close(fd)
        return None
    sock = socket.socket(fileno=fds[0])
    try:
        peer = sock.getpeername()
    except OSError:  # the client left meanwhile
        sock.close()
        return None
    return Handed(sock, message["data"], str(message.get("listener", "")), peer)
