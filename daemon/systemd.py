"""Talking to systemd: readiness notifications and the watchdog (stdlib only).

The service manager passes ``$NOTIFY_SOCKET`` to a ``Type=notify`` service.
Following sd_notify(3), a notification is one datagram of newline-separated
``KEY=VALUE`` assignments (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``STATUS=...``, ``WATCHDOG=1``) sent to that AF_UNIX socket. Outside systemd
the variable is absent and every call here is a cheap no-op.
"""

from __future__ import annotations

import os
import socket
import threading
import time

__all__ = ["notify", "reloading_lines", "watchdog_interval"]

# A send must never stall the daemon's loop for long if systemd is busy.
_SEND_TIMEOUT_S = 1.0

_lock = threading.Lock()
_sock: socket.socket | None = None
_sock_pid: int | None = None


def _notify_address(value: str) -> bytes | None:
    """Turn $NOTIFY_SOCKET into a sockaddr: a path, or "@name" for the abstract namespace."""
    if not value:
        return None
    if value[0] == "@":
        return b"\0" + os.fsencode(value[1:])
    if value[0] == "/":
        return os.fsencode(value)
    return None  # sd_notify(3) accepts only absolute paths and abstract names here


def _socket() -> socket.socket:
    """The process's one datagram socket, created on first use (and again after a fork)."""
    global _sock, _sock_pid
    pid = os.getpid()
    if _sock is None or _sock_pid != pid:
        # A socket inherited across fork() is shared with the parent; leave it
        # to the parent and make our own.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec by default
        sock.settimeout(_SEND_TIMEOUT_S)
        _sock, _sock_pid = sock, pid
    return _sock


def _reset() -> None:
    """Close the cached socket (after a send error, and for tests)."""
    global _sock, _sock_pid
    if _sock is not None and _sock_pid == os.getpid():
        try:
            _sock.close()
        except OSError:
            pass
    _sock, _sock_pid = None, None


def notify(*lines: str, environ=os.environ) -> bool:
    """Send ``lines`` to the service manager as one sd_notify(3) message.

    ``notify("READY=1", "STATUS=serving")`` sends ``b"READY=1\\nSTATUS=serving"``.
    Returns True when the datagram was handed to the kernel, False when
    ``$NOTIFY_SOCKET`` is unset or invalid or the send failed. Never raises on
    delivery problems: losing a status update must not hurt the service.
    """
    address = _notify_address(environ.get("NOTIFY_SOCKET", ""))
    if address is None or not lines:
        return False
    payload = "\n".join(lines).encode("utf-8")
    with _lock:
        try:
            sock = _socket()
            sent = sock.sendto(payload, address)
        except OSError:
            _reset()
            return False
    return sent == len(payload)


def reloading_lines() -> list[str]:
    """Lines announcing a reload: ``RELOADING=1`` plus ``MONOTONIC_USEC``.

    systemd wants the CLOCK_MONOTONIC time (microseconds) at which the reload
    began, so it can tell this reload apart from later ones. The daemon sends
    ``READY=1`` again once the reload has finished (or failed).
    """
    return ["RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}"]


def watchdog_interval(environ=os.environ) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings, or None when no watchdog is asked for.

    systemd sets ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) when the unit has
    ``WatchdogSec=``; as sd_watchdog_enabled(3) advises, we ping at half that
    period. A ``WATCHDOG_PID`` naming another process means the watchdog is
    not ours (the variables were inherited), so it is ignored.
    """
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != "":
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000
