"""What a gthread connection hands on: exactly the bytes of the request not yet
served (real sockets, no worker)."""

from __future__ import annotations

import socket

from appd.http import ServerInfo
from appd.http.kept import Kept

INFO = ServerInfo("127.0.0.1", "8000")
REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"


def _kept(pending: bytes = b"") -> tuple[Kept, socket.socket]:
    ours, client = socket.socketpair()
    return Kept(ours, ("127.0.0.1", 5000), INFO, "main", pending=pending), client


def test_bytes_handed_to_us_and_not_read_travel_on_as_they_came():
    kept, client = _kept(pending=REQUEST)
    with client:
        assert kept.unread() == REQUEST
        assert kept.wants_turn()  # no readiness will announce them: a thread must look
        kept.close()


def test_a_parsed_request_is_not_handed_on():
    kept, client = _kept()
    with client:
        client.sendall(REQUEST)
        assert kept.read_waiting() and kept.request_ready()
        assert kept.unread() is None and kept.expired(float("inf")) is None
        kept.close()


def test_half_a_head_travels_on_and_a_stale_wakeup_reads_nothing():
    kept, client = _kept()
    with client:
        assert not kept.read_waiting() and not kept.input_waiting()
        client.sendall(REQUEST[:10])
        assert kept.input_waiting() and kept.read_waiting()
        assert kept.unread() == REQUEST[:10] and not kept.wants_turn()
        kept.close()
