"""The control socket inside the daemon's loop: accepts clients, checks who
they are (SO_PEERCRED), bounds their number and idleness, decodes requests
and hands them to the command units in commands/."""

from __future__ import annotations

import grp
import os
import socket
import stat
import struct
import time

from appdctl import protocol

from .channel import Channel
from .listeners import unix_socket_owner

MAX_CLIENTS = 64
IDLE_TIMEOUT = 10.0        # a client with nothing running must send a request within this
PARTIAL_FRAME_TIMEOUT = 5.0  # a frame begun must be finished within this
_CRED = struct.Struct("3i")


class ControlSocketError(Exception):
    """The control socket path cannot be used; the message says why."""


def check_private_dir(directory: str) -> None:
    """The default directory (/tmp/appd-UID) is in a world-writable place: another
    user may have made it (or a symlink) first, to swap in their own socket and
    read what appdctl sends. Use it only if it is a real directory of ours that
    nobody else may enter."""
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise ControlSocketError(f"control socket directory {directory} is not a directory (a symlink?); "
                                 "refusing to use it")
    if info.st_uid != os.geteuid():
        raise ControlSocketError(f"control socket directory {directory} is owned by uid {info.st_uid}, "
                                 f"not {os.geteuid()}; refusing to use it")
    if info.st_mode & 0o077:
        raise ControlSocketError(f"control socket directory {directory} has mode "
                                 f"{stat.S_IMODE(info.st_mode):04o}; group and others must have no access "
                                 "(chmod 700 it)")


def prepare_path(path: str, private: bool = False) -> None:
    """Create the parent directory 0700 if absent (and, when `private`, check that
    nobody else can reach it); refuse a symlink or a non-socket at the path; fail if a live
    daemon answers there; replace a stale socket file."""
    parent = os.path.dirname(path) or "."
    if not os.path.lexists(parent):
        os.makedirs(parent, mode=0o700, exist_ok=True)
    if private:
        check_private_dir(parent)
    try:
        owner = unix_socket_owner(path, "control socket path")
    except OSError as exc:
        raise ControlSocketError(str(exc)) from None
    if owner is not None:
        raise ControlSocketError(f"another appd (pid {owner}) is already running on control socket {path}")


class ControlServer:
    """The control socket and its clients. Across a daemon re-exec it hands over
    the listening socket and each client's socket and unread bytes (export_state),
    and the new image takes them back (adopt)."""

    def __init__(self, daemon, cfg, adopt_fd: int | None = None):
        self.daemon = daemon
        self.loop = daemon.loop
        self.path = cfg.control_socket
        self.allowed_uids = {0, os.getuid(), *cfg.control_allow_uids}
        self.allowed_gids = set(cfg.control_allow_gids)
        self.clients: set[ControlClient] = set()
        if adopt_fd is not None:  # re-exec in place: the socket is already bound and listening
            self.sock = socket.socket(fileno=adopt_fd)
        else:
            self.sock = self._bind(cfg)
        self.sock.setblocking(False)
        self.loop.add_reader(self.sock, self.accept)

    def _bind(self, cfg) -> socket.socket:
        # Root's default /run/appd sits where only root writes; every other default
        # (/tmp/appd-UID, $XDG_RUNTIME_DIR) must prove it is private.
        private = cfg.sources.get("control_socket") == "default" and (
            os.geteuid() != 0 or bool(os.environ.get("XDG_RUNTIME_DIR")))
        prepare_path(self.path, private=private)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The mode comes from the umask at bind: no chmod by path, which would follow
        # a symlink planted between bind and chmod.
        old_umask = os.umask(0o777 & ~cfg.control_socket_mode)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old_umask)
        if cfg.control_socket_group:
            os.chown(self.path, -1, grp.getgrnam(cfg.control_socket_group).gr_gid, follow_symlinks=False)
        sock.listen(128)
        return sock

    def accept(self, mask: int) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # nothing waiting (BlockingIOError), or the peer already left
                return
            pid, uid, gid = _CRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
            if not self.allowed(pid, uid, gid):
                self._refuse(conn, protocol.PERMISSION_DENIED, f"uid {uid} may not control this daemon")
            elif len(self.clients) >= MAX_CLIENTS:
                self._refuse(conn, protocol.BUSY, f"too many control clients (limit {MAX_CLIENTS})")
            else:
                self.clients.add(ControlClient(self, conn))

    def allowed(self, pid: int, uid: int, gid: int) -> bool:
        if uid in self.allowed_uids or gid in self.allowed_gids:
            return True
        return bool(self.allowed_gids) and bool(self.allowed_gids & _supplementary_groups(pid))

    @staticmethod
    def _refuse(conn: socket.socket, code: str, message: str) -> None:
        try:
            conn.setblocking(False)
            conn.send(protocol.encode(protocol.error_reply(None, code, message)))
        except OSError:
            pass
        conn.close()

    def tick(self) -> None:
        now = time.monotonic()
        for client in list(self.clients):
            client.check_idle(now)

    # --- across a daemon re-exec ---

    def export_state(self, reply_to: "ControlClient | None" = None, request_id: int | None = None) -> tuple:
        """(the socket's part, the clients' part); `reply_to` gets the re-exec's reply."""
        clients = [c.export_state(request_id if c is reply_to else None)
                   for c in self.clients if not c.channel.closed]
        return {"fd": self.sock.fileno(), "path": self.path}, clients

    @classmethod
    def adopt(cls, daemon, cfg, server: dict, clients: list[dict], reply: dict) -> "ControlServer":
        """Take the socket and clients back; the client that asked for the re-exec
        gets `reply` as its answer, then what it had sent beyond is read."""
        control = cls(daemon, cfg, adopt_fd=server["fd"])
        for entry in clients:
            client = ControlClient(control, socket.socket(fileno=entry["fd"]))
            control.clients.add(client)
            if entry["reply_to"] is not None:
                client.send(protocol.ok_reply(entry["reply_to"], reply))
            if entry["buffer"]:
                client.channel.feed(entry["buffer"])
        return control

    def flush(self) -> None:
        """Send what is buffered for every client, blocking briefly (just before an exec)."""
        for client in list(self.clients):
            client.channel.flush_pending(timeout=1.0)

    def close(self) -> None:
        for client in list(self.clients):
            client.channel.flush_and_close(timeout=0.5)
        self.loop.remove(self.sock)
        self.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.unlink(self.path)
        except OSError:
            pass


def _supplementary_groups(pid: int) -> set[int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return {int(g) for g in line.split()[1:]}
    except OSError:
        pass
    return set()


class ControlClient:
    def __init__(self, server: ControlServer, sock: socket.socket):
        self.server = server
        try:  # who is asking: some arguments are reserved to root and the daemon's user
            self.peer_uid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[1]
        except OSError:
            self.peer_uid = -1
        self.running: set[int] = set()  # request ids still waiting for their final reply
        self.channel = Channel(server.loop, sock, self.on_message, self.on_close, parting_error=True)

    def on_message(self, channel, message) -> None:
        from .commands import dispatch
        request_id = message.get("id") if isinstance(message, dict) else None
        try:
            request_id, cmd, args = protocol.validate_request(message)
        except protocol.ProtocolError as exc:
            self.send(protocol.error_reply(request_id if isinstance(request_id, int) else None,
                                           exc.code, exc.message))
            return
        except Exception as exc:  # the exception boundary: this client gets its answer too
            from .daemon import internal_message
            self.server.daemon.internal_error(exc, "request validation")
            self.send(protocol.error_reply(request_id if isinstance(request_id, int) else None,
                                           protocol.INTERNAL, internal_message(exc)))
            return
        self.running.add(request_id)
        dispatch(self.server.daemon, cmd, args, ClientResponder(self, request_id))

    def send(self, message: dict) -> None:
        self.channel.send(message)

    def export_state(self, reply_to: int | None) -> dict:
        return {"fd": self.channel.sock.fileno(), "buffer": self.channel.unread(), "reply_to": reply_to}

    def check_idle(self, now: float) -> None:
        idle = now - self.channel.last_activity
        if self.channel.decoder.partial and idle > PARTIAL_FRAME_TIMEOUT:
            self.channel.close("half-written frame timed out")
        elif not self.running and idle > IDLE_TIMEOUT:
            self.channel.close("idle")

    def on_close(self, channel, reason: str) -> None:
        self.server.clients.discard(self)


class ClientResponder:
    """Sends an operation's events and final reply to the control client that asked."""

    def __init__(self, client: ControlClient, request_id: int):
        self.client = client
        self.request_id = request_id
        self.replied = False  # exactly one final reply, even when the exception boundary answers
        self.peer_uid = client.peer_uid

    def event(self, name: str, **fields) -> None:
        self.client.send(protocol.event(self.request_id, name, **fields))

    def done(self, result: dict) -> None:
        self._final(protocol.ok_reply(self.request_id, result))

    def fail(self, code: str, message: str, **extra) -> None:
        self._final(protocol.error_reply(self.request_id, code, message, **extra))

    def _final(self, reply: dict) -> None:
        if self.replied:
            return
        self.replied = True
        self.client.running.discard(self.request_id)
        self.client.channel.last_activity = time.monotonic()
        self.client.send(reply)


class LogResponder:
    """For operations started by a signal (or detached with --no-wait): outcome goes to the log."""

    def __init__(self, log, source: str = "daemon", on_done=None):
        self.log = log.bind(source=source)
        self.on_done = on_done

    def event(self, name: str, **fields) -> None:
        pass  # the operation logs its progress itself

    def done(self, result: dict) -> None:
        self.log.info("operation_done", **result)
        if self.on_done:
            self.on_done(True, None)

    def fail(self, code: str, message: str, **extra) -> None:
        self.log.error("operation_failed", code=code, message=message,
                       **{k: v for k, v in extra.items() if k != "output"})
        if self.on_done:
            self.on_done(False, {"code": code, "message": message, **extra})
