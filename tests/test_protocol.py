"""The control protocol as properties: frames survive any chunking, garbage only
ever raises ProtocolError, validate_request accepts exactly what COMMANDS
describes; and a live daemon answers arbitrary msgpack values and byte
strings with well-formed replies (or a closed connection) and stays up."""

from __future__ import annotations

import collections
import socket
import time

import msgpack
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from appdctl import protocol
from conftest import running_appd
from helpers import assert_healthy

KNOWN_CODES = {protocol.BAD_REQUEST, protocol.UNKNOWN_COMMAND, protocol.BUSY, protocol.PERMISSION_DENIED,
               protocol.TIMEOUT, protocol.FAILED, protocol.ROLLED_BACK}
READ_ONLY = sorted(cmd for cmd, (changing, _) in protocol.COMMANDS.items() if not changing)
CHANGING = sorted(cmd for cmd, (changing, _) in protocol.COMMANDS.items() if changing)

# --- strategies ---

scalars = (st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
           | st.text(max_size=20) | st.binary(max_size=20))
keys = st.text(max_size=10) | st.integers(-2**63, 2**64 - 1) | st.sampled_from(["v", "id", "cmd", "args"])
values = st.recursive(scalars, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(keys, children, max_size=4), max_leaves=12)


def _args_for(cmd: str):
    """Arguments of the right names with arbitrary values; changing commands get an
    extra unknown argument, so they are always refused and never run."""
    names = st.sampled_from(sorted(protocol.COMMANDS.get(cmd, (False, {}))[1]) or ["x"]) | st.text(max_size=8)
    args = st.dictionaries(names, values, max_size=3)
    if cmd in CHANGING:
        args = args.map(lambda a: {**a, "not-an-argument": 1})
    return args


requestish = st.sampled_from(sorted(protocol.COMMANDS) + ["nope"]).flatmap(lambda cmd: st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, 0, "1", None]), "id": st.integers(0, 2**31) | values,
     "cmd": st.just(cmd), "args": _args_for(cmd)}))


valid_read_only = st.fixed_dictionaries({"v": st.just(1), "id": st.integers(0, 2**63 - 1),
                                         "cmd": st.sampled_from(READ_ONLY)}, optional={"args": st.just({})})


def _valid_args(cmd: str):
    fields = {}
    for name, arg in protocol.COMMANDS[cmd][1].items():
        kinds = arg.kind if isinstance(arg.kind, tuple) else (arg.kind,)
        examples = st.sampled_from([st.booleans() if k is bool else st.integers(-5, 5) if k is int
                                    else st.floats(0, 10) if k is float
                                    else st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)
                                    for k in kinds]).flatmap(lambda s: s)
        fields[name] = examples
    required = {n: fields.pop(n) for n, a in list(protocol.COMMANDS[cmd][1].items()) if a.required}
    return st.fixed_dictionaries(required, optional=fields)


valid_requests = st.sampled_from(sorted(protocol.COMMANDS)).flatmap(lambda cmd: st.fixed_dictionaries(
    {"v": st.just(1), "id": st.integers(0, 2**63 - 1), "cmd": st.just(cmd), "args": _valid_args(cmd)}))


def decode_prefix(payload: bytes) -> tuple[list, bool]:
    """The messages a server decodes from `payload` before any garbage (fed byte by
    byte, so every whole frame counts), and whether the payload is clean framing."""
    decoder = protocol.FrameDecoder()
    messages = []
    for i in range(len(payload)):
        try:
            messages += decoder.feed(payload[i:i + 1])
        except protocol.ProtocolError:
            return messages, False
    return messages, not decoder.partial


def runs_something(messages: list) -> bool:
    """True if any message is a valid changing command (which the fuzzer must never send)."""
    for message in messages:
        try:
            _, cmd, _ = protocol.validate_request(message)
        except protocol.ProtocolError:
            continue
        if cmd in CHANGING:
            return True
    return False


# --- pure properties ---

@given(st.lists(values, max_size=5), st.data())
def test_frames_decode_the_same_whatever_the_chunking(messages, data):
    stream = b"".join(protocol.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    decoder = protocol.FrameDecoder()
    decoded, start = [], 0
    for cut in cuts + [len(stream)]:
        decoded += decoder.feed(stream[start:cut])
        start = cut
    expected = [msgpack.unpackb(msgpack.packb(m, use_bin_type=True), raw=False, strict_map_key=False)
                for m in messages]
    assert decoded == expected
    assert not decoder.partial


@given(st.binary(max_size=300), st.integers(1, 8))
def test_any_bytes_decode_or_raise_protocol_error_only(payload, chunk):
    decoder = protocol.FrameDecoder()
    try:
        for i in range(0, len(payload), chunk):
            for message in decoder.feed(payload[i:i + chunk]):
                msgpack.packb(message)  # whatever came out is a real msgpack value
    except protocol.ProtocolError as exc:
        assert exc.code == protocol.BAD_REQUEST and exc.message


@given(st.integers(protocol.MAX_FRAME + 1, 2**32 - 1), st.binary(max_size=16))
def test_a_length_over_the_cap_is_refused_before_the_body_arrives(length, tail):
    with pytest.raises(protocol.ProtocolError) as refused:
        protocol.FrameDecoder().feed(length.to_bytes(4, "big") + tail)
    assert refused.value.code == protocol.BAD_REQUEST and str(length) in refused.value.message


def test_encode_refuses_a_message_over_the_cap():
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"blob": b"x" * protocol.MAX_FRAME})


@given(values | requestish)
def test_validate_request_accepts_only_what_commands_describes(message):
    try:
        request_id, cmd, args = protocol.validate_request(message)
    except protocol.ProtocolError as exc:
        assert exc.code in (protocol.BAD_REQUEST, protocol.UNKNOWN_COMMAND) and exc.message
        return
    assert isinstance(message, dict) and message["v"] == protocol.VERSION
    assert request_id == message["id"] and isinstance(request_id, int) and not isinstance(request_id, bool)
    assert cmd in protocol.COMMANDS
    spec = protocol.COMMANDS[cmd][1]
    assert set(args) == set(spec)
    for name, arg in spec.items():
        if args[name] is None:
            assert not arg.required
        else:
            assert isinstance(args[name], arg.kind)
            assert not isinstance(args[name], bool) or arg.kind is bool


@given(valid_requests)
def test_every_well_typed_request_is_accepted(message):
    request_id, cmd, args = protocol.validate_request(message)
    assert (request_id, cmd) == (message["id"], message["cmd"])
    for name, value in message["args"].items():
        assert args[name] == value


def test_default_socket_path_rules():
    assert protocol.default_socket_path(1000, {"XDG_RUNTIME_DIR": "/run/user/1000"}) == "/run/user/1000/appd.sock"
    assert protocol.default_socket_path(0, {}) == "/run/appd/appd.sock"
    assert protocol.default_socket_path(1000, {}) == "/tmp/appd-1000/appd.sock"


def test_appd_and_appdctl_share_the_default_socket_path():
    from appd import config
    assert config.default_socket_path is protocol.default_socket_path


# --- the live server under fuzz ---

@pytest.fixture(scope="module")
def live_appd(tmp_path_factory):
    with running_appd(tmp_path_factory.mktemp("fuzz"), "--bind", "127.0.0.1:0", "-w", "1") as appd:
        yield appd


def exchange(path: str, payload: bytes) -> list:
    """One connection: send everything, half-close, read replies until the server closes."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(path)
        try:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server may close first on garbage
        decoder, replies = protocol.FrameDecoder(), []
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            replies += decoder.feed(data)
        assert not decoder.partial, "the server sent half a frame"
        return replies


def assert_well_formed(reply) -> None:
    assert isinstance(reply, dict) and "id" in reply, reply
    if "event" in reply:
        assert isinstance(reply["id"], int) and isinstance(reply["event"], str)
    elif reply["ok"] is True:
        assert isinstance(reply["result"], dict)
    else:
        assert reply["ok"] is False
        assert reply["error"]["code"] in KNOWN_CODES and isinstance(reply["error"]["message"], str)


def check_payload(appd, payload: bytes, seen: collections.Counter) -> None:
    messages, clean = decode_prefix(payload)
    assume(not runs_something(messages))
    replies = exchange(appd.socket, payload)
    for reply in replies:
        assert_well_formed(reply)
    finals = [r for r in replies if "event" not in r]
    seen["clean framing" if clean else "garbage framing"] += 1
    seen.update("ok" if reply["ok"] else reply["error"]["code"] for reply in finals)
    if clean:  # every frame gets exactly one final reply, in order
        assert len(finals) == len(messages), (messages, finals)
    else:  # garbage closes the connection: at most the frames before it are answered,
        # then one parting bad_request without an id says why
        parting = finals.pop() if finals and finals[-1]["id"] is None else None
        assert parting is None or parting["error"]["code"] == protocol.BAD_REQUEST, parting
        assert len(finals) <= len(messages), (messages, finals)
    for message, reply in zip(messages, finals):
        try:
            request_id, _, _ = protocol.validate_request(message)
        except protocol.ProtocolError as exc:
            assert reply["ok"] is False and reply["error"]["code"] == exc.code, (message, reply)
        else:
            assert reply["ok"] is True and reply["id"] == request_id, (message, reply)
    assert appd.proc.poll() is None, f"appd died:\n{appd.log()}"


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                        HealthCheck.filter_too_much])


def test_live_server_answers_arbitrary_msgpack_values(live_appd):
    began = time.monotonic()
    seen = collections.Counter()

    @FUZZ
    @given(st.lists(values | requestish | valid_read_only, min_size=1, max_size=3))
    def one_connection(messages):
        check_payload(live_appd, b"".join(protocol.encode(m) for m in messages), seen)

    one_connection()
    print(f"\nconnections and replies: {dict(seen)}")
    assert_healthy(live_appd)
    assert time.monotonic() - began < 30


def test_live_server_survives_arbitrary_byte_strings(live_appd):
    began = time.monotonic()
    seen = collections.Counter()
    framed_garbage = st.binary(max_size=64).map(lambda b: len(b).to_bytes(4, "big") + b)
    lying_length = st.tuples(st.integers(0, 2**32 - 1), st.binary(max_size=64)).map(
        lambda t: t[0].to_bytes(4, "big") + t[1])

    pieces = (st.binary(max_size=256) | framed_garbage | lying_length
              | (values | requestish | valid_read_only).map(protocol.encode))

    @FUZZ
    @given(st.lists(pieces, min_size=1, max_size=3).map(b"".join))
    def one_connection(payload):
        check_payload(live_appd, payload, seen)

    one_connection()
    print(f"\nconnections and replies: {dict(seen)}")
    assert_healthy(live_appd)
    assert time.monotonic() - began < 30
