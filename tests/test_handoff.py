"""The handoff channel on its own, over real sockets: a TCP connection passed
with the bytes already read of its next request arrives as the same
connection; a full channel says no at once instead of blocking; anything
malformed in the channel is dropped without leaking a descriptor; and the
part of a pipelined request already read is found exactly."""

from __future__ import annotations

import array
import os
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appd import handoff
from appd.http.kept import partial_tail


@pytest.fixture
def channel():
    made = handoff.Channel.create()
    yield made
    made.close()


@pytest.fixture
def tcp_pair():
    """(client, accepted server side) of a real loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname(), timeout=5)
    server, _ = listener.accept()
    listener.close()
    yield client, server
    client.close()
    server.close()


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_a_connection_arrives_whole_with_what_was_read(channel, tcp_pair):
    client, server = tcp_pair
    assert channel.send(server, b"GET /next HTTP/1.1\r\nHo", "http")
    server.close()  # the sender's copy: the connection itself is in the channel
    [handed] = channel.receive(10)
    assert handed.data == b"GET /next HTTP/1.1\r\nHo" and handed.listener == "http"
    with handed.sock as taken:
        assert taken.getpeername() == client.getsockname()
        client.sendall(b"st: x\r\n\r\n")
        taken.settimeout(5)
        assert taken.recv(100) == b"st: x\r\n\r\n"
        taken.sendall(b"answer")
        assert client.recv(100) == b"answer"
    assert channel.receive(10) == []


def test_each_connection_is_taken_once(channel, tcp_pair):
    _, server = tcp_pair
    assert channel.send(server, b"", "http")
    first, second = channel.receive(1), channel.receive(1)
    assert len(first) == 1 and second == []
    first[0].sock.close()


def test_a_full_channel_refuses_at_once(channel, tcp_pair):
    _, server = tcp_pair
    sent = 0
    while channel.send(server, b"x" * 4000, "http"):  # never blocks: stops at the first refusal
        sent += 1
        assert sent < 100_000
    assert sent > 10
    assert not channel.send(server, b"", "http")
    taken = channel.receive(sent + 10)
    assert len(taken) == sent
    for handed in taken:
        handed.sock.close()


def test_too_much_read_data_is_refused(channel, tcp_pair):
    _, server = tcp_pair
    assert not channel.send(server, b"x" * (handoff.MAX_DATA + 1), "http")
    assert channel.receive(1) == []


def test_malformed_messages_are_dropped_without_leaking(channel, tcp_pair):
    _, server = tcp_pair
    before = open_fds()
    channel.send_sock.send(b"no descriptor")
    rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [server.fileno()] * 2))]
    channel.send_sock.sendmsg([b"\x93two fds, not msgpack map"], rights)
    assert channel.receive(10) == []
    assert open_fds() == before


def test_the_channel_survives_in_a_child_by_its_environment_variable(channel):
    env = channel.env()
    assert env[handoff.ENV] == f"{channel.send_sock.fileno()},{channel.recv_sock.fileno()}"
    assert all(os.get_inheritable(fd) for fd in channel.fds())
    assert handoff.Channel.from_env({}) is None
    assert handoff.Channel.from_env({handoff.ENV: "nonsense"}) is None


PIPELINED = [
    (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /b HTTP/1.1\r\nHo"),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello", b"GET /b HTTP/1.1\r\n"),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
     b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n", b"\r\nGET /c HTTP/1.1\r\nX-A: 1\r"),
    (b"", b"GET /only-part"),
]


@pytest.mark.parametrize("whole, partial", PIPELINED)
def test_the_part_of_a_pipelined_request_already_read_is_found(whole, partial):
    assert partial_tail(whole + partial) == partial


def _request(method: str, path: str, body: bytes, chunked: bool) -> bytes:
    head = f"{method} /{path} HTTP/1.1\r\nHost: x\r\n"
    if chunked:
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:3], body[3:]) if part)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\n\r\n"
    if method == "POST":
        return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    return (head + "\r\n").encode()


requests = st.builds(_request, st.sampled_from(["GET", "POST", "DELETE"]),
                     st.text("abc/", max_size=10), st.binary(max_size=40), st.booleans())


@settings(max_examples=200, deadline=None)
@given(st.lists(requests, max_size=4), requests, st.data())
def test_the_partly_read_request_is_found_after_any_whole_ones(whole, last, data):
    cut = data.draw(st.integers(1, last.index(b"\r\n\r\n") + 3))  # somewhere in the last head
    partial = last[:cut]
    assert partial_tail(b"".join(whole) + partial) == partial
