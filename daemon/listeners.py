"""Listening sockets: parse addresses, bind them once, inherit them (systemd's
LISTEN_FDS or our own APPD_FDS), and describe them to new generations."""

from __future__ import annotations

import errno
import os
import socket
import struct
import stat
from dataclasses import dataclass


@dataclass(frozen=True)
class Address:
    spec: str         # as the operator wrote it
    family: int
    target: object    # (host, port) or a path or an fd number
    kind: str         # "tcp", "unix" or "fd"


def parse_address(spec: str) -> Address:
    """'host:port', '[v6]:port', 'unix:PATH' or 'fd://N'; ValueError names the bad address."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path:
            raise ValueError(f"{spec!r} has no socket path")
        return Address(spec, socket.AF_UNIX, path, "unix")
    if spec.startswith("fd://"):
        try:
            fd = int(spec[5:])
        except ValueError:
            raise ValueError(f"{spec!r} is not fd://N with N a file descriptor number") from None
        if not 0 <= fd < 2 ** 31:
            raise ValueError(f"{spec!r}: {fd} is not a file descriptor number")
        return Address(spec, 0, fd, "fd")
    if spec.startswith("["):
        host, sep, port = spec[1:].partition("]:")
        family = socket.AF_INET6
        if not sep:
            raise ValueError(f"{spec!r} is not [V6ADDRESS]:PORT")
    else:
        host, sep, port = spec.rpartition(":")
        family = socket.AF_INET
        if not sep:
            raise ValueError(f"{spec!r} has no port; use HOST:PORT, [V6]:PORT, unix:PATH or fd://N")
        if ":" in host:
            raise ValueError(f"{spec!r}: an IPv6 address needs brackets, as in [::1]:8000")
        host = host or "0.0.0.0"
    try:
        port_number = int(port)
    except ValueError:
        raise ValueError(f"{spec!r}: port {port!r} is not a number") from None
    if not 0 <= port_number <= 65535:
        raise ValueError(f"{spec!r}: port {port_number} is out of range")
    return Address(spec, family, (host, port_number), "tcp")


@dataclass
class Listener:
    name: str
    sock: socket.socket
    spec: str
    owned: bool = False  # appd bound this unix path itself, so it may unlink it (not systemd's)

    @property
    def fd(self) -> int:
        return self.sock.fileno()

    @property
    def address(self) -> str:
        """The bound address as a string (port 0 resolved to the real port)."""
        name = self.sock.getsockname()
        if self.sock.family == socket.AF_UNIX:
            return "unix:" + (name if isinstance(name, str) else name.decode(errors="replace"))
        if self.sock.family == socket.AF_INET6:
            return f"[{name[0]}]:{name[1]}"
        return f"{name[0]}:{name[1]}"

    def describe(self) -> dict:
        described = {"name": self.name, "address": self.address, "fd": self.fd}
        described.update(zip(("queued", "max_queued"), backlog(self.sock)))
        return described


def backlog(sock: socket.socket) -> tuple:
    """(connections waiting to be accepted, the backlog's size) of a listening TCP
    socket: Linux reports them in TCP_INFO as tcpi_unacked and tcpi_sacked.
    () where that is not available (unix sockets, other systems)."""
    if sock.family == socket.AF_UNIX or not hasattr(socket, "TCP_INFO"):
        return ()
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    except OSError:
        return ()
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked
    return struct.unpack_from("=II", info, 24) if len(info) >= 32 else ()


_CRED = struct.Struct("3i")


def unix_socket_owner(path: str, what: str = "") -> int | None:
    """Who listens on the unix socket at `path`: None when nobody does (a stale
    file, now unlinked, or no file), else the listener's pid. The one check for
    unix listeners and the control socket alike: a symlink or a non-socket is
    refused, and a socket whose owner cannot be told (EACCES, a live owner too
    busy to accept) is never deleted."""
    label = f"{what} {path}" if what else path
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        raise OSError(f"{label} is a symlink; refusing to use it")
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{label} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
        return _CRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))[0]
    except (ConnectionRefusedError, FileNotFoundError):  # stale: its owner is gone
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return None
    except OSError as exc:
        raise OSError(f"{label} may be in use ({exc.strerror or exc}); refusing to replace it") from None
    finally:
        probe.close()


def _bind_unix(path: str, backlog: int, mode: int) -> socket.socket:
    owner = unix_socket_owner(path)
    if owner is not None:
        raise OSError(f"{path} is in use by another live process (pid {owner})")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)  # the mode at creation: no chmod by path (symlink races)
    try:
        sock.bind(path)
    finally:
        os.umask(old_umask)
    sock.listen(backlog)
    return sock


def bind(address: Address, backlog: int, unix_mode: int = 0o666) -> socket.socket:
    """Bind and listen on one address. OSError says which address failed and why."""
    try:
        if address.kind == "unix":
            sock = _bind_unix(address.target, backlog, unix_mode)
        elif address.kind == "fd":
            sock = socket.socket(fileno=address.target)
            sock.listen(backlog)
        else:
            sock = socket.socket(address.family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address.target)
            sock.listen(backlog)
    except OSError as exc:
        raise OSError(f"cannot listen on {address.spec}: {exc.strerror or exc}") from None
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    os.set_inheritable(sock.fileno(), True)
    return sock


def _name_for(address: Address, index: int) -> str:
    return "http" if index == 0 else f"http{index}"


def open_listeners(specs: list[str], backlog: int, inherited: dict[str, socket.socket] | None = None,
                   current: list[Listener] | None = None, unix_mode: int = 0o666) -> list[Listener]:
    """Listeners for `specs`, reusing `current` ones and `inherited` sockets where they match.

    An inherited socket (systemd socket activation) is matched by its name when the
    name equals the bind spec's name, else by the address it is bound to.
    """
    inherited = inherited if inherited is not None else {}  # consumed: what is left matched nothing
    by_spec = {listener.spec: listener for listener in (current or [])}
    result = []
    for index, spec in enumerate(specs):
        if spec in by_spec:
            result.append(by_spec.pop(spec))
            continue
        address = parse_address(spec)
        name = _name_for(address, index)
        sock = _take_inherited(inherited, address, name)
        owned = sock is None and address.kind == "unix"
        if sock is None:
            sock = bind(address, backlog, unix_mode)
        result.append(Listener(name, sock, spec, owned))
    return result


def initial_listeners(specs: list[str], explicit: bool, backlog: int, inherited: dict[str, socket.socket],
                      unix_mode: int = 0o666) -> list[Listener]:
    """The daemon's first listeners. Socket activation without an explicit bind: the
    activated sockets are the listeners (as gunicorn does). With an explicit bind,
    every activated socket must match a bind entry, or it would hang unserved."""
    if inherited and not explicit:
        return [Listener(name, sock, f"fd://{sock.fileno()}") for name, sock in inherited.items()]
    left = dict(inherited)
    result = open_listeners(specs, backlog, left, unix_mode=unix_mode)
    if left:
        unmatched = ", ".join(f"{name} ({_describe(sock)})" for name, sock in left.items())
        for listener in result:
            if listener.owned:
                unlink_owned(listener)
            listener.sock.close()
        raise OSError(f"socket-activated socket(s) {unmatched} match no bind address "
                      f"({', '.join(specs)}); add them to bind, or leave bind unset to serve them")
    return result


def _describe(sock: socket.socket) -> str:
    try:
        return Listener("", sock, "").address
    except OSError as exc:
        return f"unknown address: {exc.strerror or exc}"


def unlink_owned(listener: Listener) -> None:
    """Remove the socket file of a unix listener appd bound itself (never systemd's)."""
    if listener.owned and listener.address.startswith("unix:"):
        try:
            os.unlink(listener.address[5:])
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


def _take_inherited(inherited: dict[str, socket.socket], address: Address, name: str):
    if name in inherited:
        return inherited.pop(name)
    for key, sock in list(inherited.items()):
        if _matches(sock, address):
            return inherited.pop(key)
    return None


def _matches(sock: socket.socket, address: Address) -> bool:
    try:
        bound = sock.getsockname()
    except OSError:
        return False
    if address.kind == "unix":
        return sock.family == socket.AF_UNIX and bound == address.target
    if address.kind == "tcp" and sock.family == address.family:
        host, port = address.target
        return bound[1] == port and (bound[0] == host or host in ("0.0.0.0", "::"))
    return False


def from_systemd(environ=os.environ) -> dict[str, socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_FDS, LISTEN_PID, LISTEN_FDNAMES)."""
    if environ.get("LISTEN_PID") not in (None, str(os.getpid())):
        return {}
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return {}
    names = environ.get("LISTEN_FDNAMES", "").split(":") if environ.get("LISTEN_FDNAMES") else []
    sockets = {}
    for index in range(count):
        fd = 3 + index
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        os.set_inheritable(fd, True)
        name = names[index] if index < len(names) and names[index] else f"fd{fd}"
        if name in sockets:  # systemd repeats a FileDescriptorName= given once for several sockets
            name = f"{name}{index}"
        sockets[name] = sock
    for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        os.environ.pop(key, None)
    return sockets


def generation_env(listeners: list[Listener]) -> dict[str, str]:
    """The APPD_FDS / APPD_FD_NAMES variables a new generation receives."""
    return {
        "APPD_FDS": ",".join(str(l.fd) for l in listeners),
        "APPD_FD_NAMES": ":".join(l.name for l in listeners),
    }


def from_generation_env(environ=os.environ) -> list[Listener]:
    """The listeners a master inherited from its daemon."""
    fds = [int(fd) for fd in environ.get("APPD_FDS", "").split(",") if fd]
    names = environ.get("APPD_FD_NAMES", "").split(":")
    result = []
    for index, fd in enumerate(fds):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        os.set_inheritable(fd, False)  # the master's workers fork; nothing it execs gets these
        name = names[index] if index < len(names) else f"fd{fd}"
        result.append(Listener(name, sock, f"fd://{fd}"))
    return result
