"""A small client for ops scripts; the appdctl CLI is built on it.

    from appdctl import Client
    with Client() as c:
        print(c.call("status"))
        result = c.call("upgrade", on_event=print)   # raises CommandError on failure
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from . import protocol


class CommandError(Exception):
    """The daemon answered ok=false, or could not be reached. `code` is a protocol error code."""

    def __init__(self, code: str, message: str, detail: dict | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.detail = detail or {}

    @property
    def exit_code(self) -> int:
        return protocol.EXIT_CODES.get(self.code, protocol.EXIT_FAILED)


def _expected_uid() -> int | None:
    text = os.environ.get("APPD_EXPECT_UID")
    return int(text) if text and text.isdigit() else None


class Client:
    """`expect_uid` (or APPD_EXPECT_UID): a further uid the daemon may run as,
    besides root and our own; anyone else on the socket gets nothing from us."""

    def __init__(self, path: str | None = None, timeout: float | None = 30.0, expect_uid: int | None = None):
        self.path = path or os.environ.get("APPD_SOCKET") or protocol.default_socket_path()
        self.timeout = timeout
        self.expect_uid = expect_uid if expect_uid is not None else _expected_uid()
        self._sock: socket.socket | None = None
        self._ids = itertools.count(1)
        self._decoder = protocol.FrameDecoder()
        self._pending: list = []

    def connect(self) -> "Client":
        if self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(self.timeout if self.timeout else None)
                sock.connect(self.path)
            except PermissionError:  # the file or its directory exists but is not ours to use
                sock.close()
                raise CommandError(protocol.PERMISSION_DENIED,
                                   f"permission denied connecting to {self.path}: this user may not use "
                                   "the control socket (see control_socket_mode and control_allow_uids)") from None
            except OSError as exc:
                sock.close()
                raise CommandError(protocol.UNREACHABLE,
                                   f"no daemon answers on {self.path}: {exc.strerror or exc}") from None
            self._check_server(sock)
            self._sock = sock
        return self

    def _check_server(self, sock: socket.socket) -> None:
        """Before sending anything (upgrade --env may carry secrets): the process
        listening must run as root, as us, or as the uid we were told to expect,
        never as another user who got to the socket path first."""
        cred = struct.Struct("3i")
        pid, uid, _ = cred.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, cred.size))
        if uid in (0, os.getuid(), self.expect_uid):
            return
        sock.close()
        raise CommandError(protocol.PERMISSION_DENIED,
                           f"the process on {self.path} (pid {pid}) runs as uid {uid}, not root or uid "
                           f"{os.getuid()}; refusing to talk to it (APPD_EXPECT_UID={uid} if you trust it)")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Client":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def call(self, cmd: str, on_event=None, **args) -> dict:
        """Send one command and wait for its final reply; return the result map.

        Progress events are passed to `on_event(event_map)` as they arrive.
        Raises CommandError with the daemon's error code when ok is false.
        """
        self.connect()
        request_id = next(self._ids)
        args = {k: v for k, v in args.items() if v is not None}
        try:
            self._sock.sendall(protocol.encode({"v": protocol.VERSION, "id": request_id,
                                                "cmd": cmd, "args": args}))
        except OSError:
            pass  # a daemon that refused us (busy, permission) has closed; its reason is still readable
        deadline = None if not self.timeout else time.monotonic() + self.timeout
        while True:
            message = self._next_message(deadline)
            # A refusal at accept time (busy, permission_denied) has id None: it is for us.
            if message.get("id") != request_id and not (message.get("id") is None and message.get("ok") is False):
                continue
            if "event" in message:
                if on_event is not None:
                    on_event(message)
                continue
            if message.get("ok"):
                return message.get("result") or {}
            error = message.get("error") or {}
            raise CommandError(error.get("code", protocol.FAILED), error.get("message", "failed"), error)

    def _next_message(self, deadline: float | None) -> dict:
        while not self._pending:
            if deadline is not None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise CommandError(protocol.TIMEOUT, f"no reply within {self.timeout} s; "
                                       "the operation may still be running (see appdctl status)")
                self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError as exc:
                raise CommandError(protocol.UNREACHABLE, f"connection to the daemon lost: {exc}") from None
            if not data:
                raise CommandError(protocol.UNREACHABLE, "the daemon closed the connection before replying")
            self._pending.extend(self._decoder.feed(data))
        return self._pending.pop(0)
