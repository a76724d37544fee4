"""The control socket over real connections: bad input of every kind, slow and
idle clients, many clients, the client limit, peer-credential checks against
a process of another uid, and the rules for the socket file itself.

After each case the daemon still answers `status` and the service still
serves HTTP 200."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import pytest

from appdctl import protocol
from conftest import APPD, APPS, Appd, running_appd, wait_until
from helpers import assert_healthy

MIB = 1024 * 1024


# --- helpers ---

def connect(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(path)
    return sock


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request(cmd, args=None, request_id=1, **extra) -> dict:
    message = {"v": 1, "id": request_id, "cmd": cmd, "args": args or {}}
    message.update(extra)
    return message


def read_message(sock: socket.socket, decoder: protocol.FrameDecoder | None = None) -> dict:
    decoder = decoder or protocol.FrameDecoder()
    while True:
        data = sock.recv(65536)
        assert data, "the server closed the connection instead of replying"
        messages = decoder.feed(data)
        if messages:
            assert len(messages) == 1, messages
            return messages[0]


def ask(sock: socket.socket, message) -> dict:
    """Send one request frame and return the final reply (skipping events)."""
    sock.sendall(frame(msgpack.packb(message, use_bin_type=True)))
    decoder = protocol.FrameDecoder()
    while True:
        reply = read_message(sock, decoder)
        if "event" not in reply:
            return reply


def read_until_closed(sock: socket.socket, within: float) -> tuple[list, float]:
    """Read until the server closes; return (messages received, seconds until the close)."""
    began = time.monotonic()
    sock.settimeout(within)
    decoder = protocol.FrameDecoder()
    messages = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        except socket.timeout:
            raise AssertionError(f"the server kept the connection open for more than {within} s") from None
        if not data:
            break
        messages.extend(decoder.feed(data))
    return messages, time.monotonic() - began


def assert_error_reply(reply: dict, code: str, request_id=None) -> dict:
    assert reply["ok"] is False, reply
    assert reply["id"] == request_id, reply
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    return reply["error"]


@pytest.fixture(scope="module")
def shared_appd(tmp_path_factory):
    """One daemon for the many bad-input cases; each test checks it is still healthy."""
    with running_appd(tmp_path_factory.mktemp("control"), "--bind", "127.0.0.1:0", "-w", "1") as appd:
        yield appd


# --- garbage and broken frames ---

@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n",          # length prefix reads as ~1.2 GB
    b"\xff" * 64,                                           # length 4 GiB - 1
    frame(b"\xc1\xc1\xc1"),                                 # 0xc1 is never valid msgpack
    frame(b"\x93\x01"),                                     # array of 3 with one element
    frame(b"\x01\x02\x03"),                                 # three values where one is expected
], ids=["http", "ff", "never-used-byte", "short-array", "extra-data"])
def test_garbage_bytes_get_a_parting_error_then_a_close_and_harm_nothing(shared_appd, garbage):
    with connect(shared_appd.socket) as sock:
        sock.sendall(garbage)
        messages, _ = read_until_closed(sock, within=5)
    assert len(messages) == 1, messages
    error = assert_error_reply(messages[0], protocol.BAD_REQUEST)
    assert "closing the connection" in error["message"]
    assert_healthy(shared_appd)


def test_a_length_over_1_mib_is_refused_without_reading_the_body(shared_appd):
    with connect(shared_appd.socket) as sock:
        sock.sendall(struct.pack(">I", MIB + 1))
        messages, _ = read_until_closed(sock, within=5)
    assert len(messages) == 1, messages
    error = assert_error_reply(messages[0], protocol.BAD_REQUEST)
    assert f"frame length {MIB + 1} exceeds {MIB}" in error["message"]
    assert_healthy(shared_appd)


def test_a_frame_just_under_1_mib_is_read_whole_and_answered(shared_appd):
    """Partial reads are reassembled: a ~1 MiB request gets its (error) reply."""
    with connect(shared_appd.socket) as sock:
        reply = ask(sock, request("status", {"padding": "x" * (MIB - 100)}, request_id=9))
        error = assert_error_reply(reply, protocol.BAD_REQUEST, 9)
        assert "padding" in error["message"]
        assert ask(sock, request("ping", request_id=10))["ok"] is True
    assert_healthy(shared_appd)


def test_a_truncated_frame_then_close_harms_nothing(shared_appd):
    body = msgpack.packb(request("status"))
    with connect(shared_appd.socket) as sock:
        sock.sendall(frame(body)[:len(body) // 2])
    with connect(shared_appd.socket) as sock:
        sock.sendall(struct.pack(">I", 100)[:3])  # not even a whole length prefix
    assert_healthy(shared_appd)


def test_a_non_map_body_gets_bad_request_and_the_connection_stays_usable(shared_appd):
    with connect(shared_appd.socket) as sock:
        for value in ([1, 2, 3], "status", 42, None, b"\x00"):
            assert_error_reply(ask(sock, value), protocol.BAD_REQUEST)
        reply = ask(sock, request("status", request_id=5))
        assert reply["id"] == 5 and reply["ok"] is True and reply["result"]["daemon"]["pid"] == shared_appd.pid
    assert_healthy(shared_appd)


@pytest.mark.parametrize("message, code, says", [
    (request("scale", {"delta": "1"}), protocol.BAD_REQUEST, "must be int"),
    (request("scale", {"delta": True}), protocol.BAD_REQUEST, "must be int"),
    (request("scale", {"count": 1.5}), protocol.BAD_REQUEST, "must be int"),
    (request("retire", {"pid": "123"}), protocol.BAD_REQUEST, "must be int"),
    (request("upgrade", {"wait": "yes"}), protocol.BAD_REQUEST, "must be bool"),
    (request("upgrade", {"env": ["K=V"]}), protocol.BAD_REQUEST, "must be dict"),
    (request("upgrade", {"env": {"K": 1}}), protocol.BAD_REQUEST, "env"),
    (request("drain", {"timeout": "soon"}), protocol.BAD_REQUEST, "timeout"),
    (request("retire", {}), protocol.BAD_REQUEST, "required"),
    (request("scale", {}), protocol.BAD_REQUEST, "exactly one"),
    (request("scale", {"delta": 1, "count": 2}), protocol.BAD_REQUEST, "exactly one"),
    (request("status", {"verbose": True}), protocol.BAD_REQUEST, "unknown argument"),
    (request("ping", "not-a-map"), protocol.BAD_REQUEST, "args must be a map"),
    (request("ping", v=2), protocol.BAD_REQUEST, "version"),
    (request("ping", v="1"), protocol.BAD_REQUEST, "version"),
    ({"id": 1, "cmd": "ping"}, protocol.BAD_REQUEST, "version"),
    (request("launch-missiles"), protocol.UNKNOWN_COMMAND, "launch-missiles"),
    (request(42), protocol.BAD_REQUEST, "cmd"),
], ids=["delta-str", "delta-bool", "count-float", "pid-str", "wait-str", "env-list", "env-values",
        "timeout-str", "missing-pid", "scale-neither", "scale-both", "unknown-arg", "args-not-map",
        "version-2", "version-str", "version-missing", "unknown-command", "cmd-int"])
def test_invalid_requests_get_a_typed_error_reply(shared_appd, message, code, says):
    before = shared_appd.status()
    with connect(shared_appd.socket) as sock:
        error = assert_error_reply(ask(sock, message), code, request_id=1)
        assert says in error["message"], error
        assert ask(sock, request("ping", request_id=2))["ok"] is True
    after = shared_appd.status()
    assert after["target_workers"] == before["target_workers"]
    assert [g["id"] for g in after["generations"]] == [g["id"] for g in before["generations"]]
    assert_healthy(shared_appd)


def test_command_names_take_the_cli_spelling_too(shared_appd):
    """reopen-logs on the wire as appdctl spells it, reopen_logs as the table does."""
    with connect(shared_appd.socket) as sock:
        for request_id, name in enumerate(("reopen-logs", "reopen_logs"), start=1):
            reply = ask(sock, request(name, request_id=request_id))
            assert reply["ok"] is True and reply["id"] == request_id, reply
    assert_healthy(shared_appd)


def test_a_non_integer_request_id_is_refused_with_a_null_id(shared_appd):
    with connect(shared_appd.socket) as sock:
        error = assert_error_reply(ask(sock, request("ping", request_id="seven")), protocol.BAD_REQUEST)
        assert "id" in error["message"]
    assert_healthy(shared_appd)


# --- slow, silent and many clients ---

def test_silent_and_half_written_clients_are_closed_after_their_timeouts(shared_appd):
    """A client that never writes is closed after the idle timeout (~10 s); one that
    stops in the middle of a frame after the partial-frame timeout (~5 s). Both at
    once, while other clients are served."""
    silent = connect(shared_appd.socket)
    half = connect(shared_appd.socket)
    try:
        half.sendall(frame(msgpack.packb(request("status")))[:7])
        began = time.monotonic()
        # Meanwhile the daemon serves others without delay.
        for _ in range(3):
            t = time.monotonic()
            assert_healthy(shared_appd)
            assert time.monotonic() - t < 1.0
        read_until_closed(half, within=12)
        half_closed = time.monotonic() - began
        read_until_closed(silent, within=15 - (time.monotonic() - began))
        silent_closed = time.monotonic() - began
    finally:
        silent.close()
        half.close()
    assert 4.0 <= half_closed <= 8.0, f"half-written frame closed after {half_closed:.1f} s"
    assert 9.0 <= silent_closed <= 15.0, f"silent client closed after {silent_closed:.1f} s"
    assert_healthy(shared_appd)


def test_fifty_clients_at_once_are_all_answered(shared_appd):
    clients = [connect(shared_appd.socket, timeout=10) for _ in range(50)]
    try:
        for number, sock in enumerate(clients):
            sock.sendall(protocol.encode(request("status", request_id=number)))
        for number, sock in enumerate(clients):
            reply = read_message(sock)
            assert reply["id"] == number and reply["ok"] is True
            assert reply["result"]["daemon"]["pid"] == shared_appd.pid
    finally:
        for sock in clients:
            sock.close()
    assert_healthy(shared_appd)


def test_clients_beyond_the_limit_are_refused_busy(start_appd):
    """64 clients held open (each proved accepted by a ping): the 65th gets busy and
    is closed; once they go, status works again."""
    from appd.control import MAX_CLIENTS
    assert MAX_CLIENTS == 64
    appd = start_appd("-w", "1")
    held = []
    try:
        for number in range(MAX_CLIENTS):
            sock = connect(appd.socket)
            held.append(sock)
            assert ask(sock, request("ping", request_id=number))["ok"] is True, f"client {number} refused"
        with connect(appd.socket) as extra:
            messages, _ = read_until_closed(extra, within=5)
        assert len(messages) == 1
        error = assert_error_reply(messages[0], protocol.BUSY)
        assert "64" in error["message"]
        # appdctl reports the refusal as busy, exit 4.
        result = appd.ctl("status")
        assert result.returncode == 4, (result.returncode, result.stderr)
        assert "busy" in result.stderr and "too many control clients" in result.stderr
        # Held clients are still served while extra ones are refused.
        assert ask(held[0], request("status", request_id=99))["ok"] is True
    finally:
        for sock in held:
            sock.close()
    wait_until(lambda: appd.status(), 5, message="status once the held clients closed")
    assert_healthy(appd)


# --- peer credentials: a client of another uid ---

NOBODY = 65534


@pytest.fixture
def open_dir():
    """A directory every user can traverse (pytest's tmp dirs are 0700), removed afterwards."""
    path = tempfile.mkdtemp(prefix="test-ctl-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def as_nobody():
    """run(*appdctl_args) -> CompletedProcess: the real appdctl CLI run as uid/gid nobody.

    The venv's interpreter lives under /root (0700), so nobody runs the system
    python3 of the same minor version with appdctl and msgpack on PYTHONPATH."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a child as nobody")
    system_python = shutil.which("python3", path="/usr/bin:/bin")
    if system_python is None:
        pytest.skip("no system python3 that nobody may run")
    version = subprocess.run([system_python, "-c", "import sys; print(sys.version_info[:2])"],
                             capture_output=True, text=True).stdout.strip()
    if version != str(tuple(sys.version_info[:2])):
        pytest.skip(f"system python {version} differs from the venv's; msgpack would not load")
    links = Path(tempfile.mkdtemp(prefix="test-nobody-"))
    os.chmod(links, 0o755)
    (links / "appdctl").symlink_to(Path(protocol.__file__).parent)
    site = str(Path(msgpack.__file__).parent.parent)
    script = "import sys; from appdctl.cli import main; sys.exit(main())"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([system_python, "-c", script, *args], user=NOBODY, group=NOBODY, extra_groups=[],
                              env={"PYTHONPATH": f"{links}:{site}", "PYTHONDONTWRITEBYTECODE": "1"},
                              cwd="/", capture_output=True, text=True, timeout=30)
    yield run
    shutil.rmtree(links, ignore_errors=True)


def start_on(start_appd, path: Path, *args: str) -> Appd:
    """start_appd with the control socket at `path` instead of the fixture's 0700 tmp dir."""
    appd = start_appd("-w", "1", "--control-socket", str(path), *args, wait=False)
    appd.socket = str(path)
    appd.wait_ready()
    return appd


def test_nobody_cannot_even_connect_to_the_default_0600_socket(start_appd, open_dir, as_nobody):
    appd = start_on(start_appd, open_dir / "ctl.sock")
    assert stat.S_IMODE(os.stat(appd.socket).st_mode) == 0o600
    result = as_nobody("--socket", appd.socket, "status")
    assert result.returncode == 4, (result.returncode, result.stderr)
    assert "permission" in result.stderr.lower() and appd.socket in result.stderr
    assert_healthy(appd)


def test_nobody_on_a_0666_socket_is_refused_by_peer_credentials(start_appd, open_dir, as_nobody):
    appd = start_on(start_appd, open_dir / "ctl.sock", "--control-socket-mode", "0666")
    assert stat.S_IMODE(os.stat(appd.socket).st_mode) == 0o666
    for command in ("status", "ping", "stop"):
        result = as_nobody("--socket", appd.socket, command)
        assert result.returncode == 4, (command, result.returncode, result.stderr)
        assert "permission_denied" in result.stderr and "uid 65534" in result.stderr
    assert_healthy(appd)


def test_nobody_allowed_by_control_allow_uids(start_appd, open_dir, as_nobody):
    appd = start_on(start_appd, open_dir / "ctl.sock", "--control-socket-mode", "0666",
                    "--control-allow-uids", str(NOBODY))
    result = as_nobody("--socket", appd.socket, "--json", "ping")
    assert result.returncode == 0, result.stderr
    assert str(appd.pid) in result.stdout
    assert as_nobody("--socket", appd.socket, "status").returncode == 0
    assert_healthy(appd)


# --- the socket file and its directory ---

def run_appd_expecting_failure(socket_path: Path, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """`appd start` that must refuse to start; stopped (and failed) if it serves instead."""
    proc = subprocess.Popen([APPD, "start", "--bind", "127.0.0.1:0", "--control-socket", str(socket_path)],
                            cwd=APPS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        raise AssertionError(f"appd started on {socket_path} instead of refusing:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


def test_socket_is_0600_in_a_new_0700_directory(start_appd, tmp_path):
    path = tmp_path / "run" / "appd" / "ctl.sock"
    appd = start_on(start_appd, path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert_healthy(appd)


def test_socket_mode_is_configurable(start_appd, tmp_path):
    appd = start_on(start_appd, tmp_path / "ctl.sock", "--control-socket-mode", "0660")
    assert stat.S_IMODE(os.stat(appd.socket).st_mode) == 0o660
    assert_healthy(appd)


def test_a_second_appd_on_a_live_socket_fails_and_the_first_keeps_serving(start_appd):
    first = start_appd("-w", "1")
    inode = os.stat(first.socket).st_ino
    result = run_appd_expecting_failure(Path(first.socket))
    assert result.returncode != 0
    assert "already running" in result.stdout and first.socket in result.stdout, result.stdout
    assert str(first.pid) in result.stdout, "the message should name the live daemon's pid"
    assert os.stat(first.socket).st_ino == inode, "the live daemon's socket file was replaced"
    assert_healthy(first)


def test_a_stale_socket_file_is_replaced(start_appd, tmp_path):
    path = tmp_path / "ctl.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()
    with pytest.raises(ConnectionRefusedError):
        connect(str(path))
    appd = start_on(start_appd, path)
    assert stat.S_ISSOCK(os.lstat(path).st_mode)
    assert_healthy(appd)  # status answers on that very path


def test_a_regular_file_at_the_socket_path_is_refused(tmp_path):
    path = tmp_path / "ctl.sock"
    path.write_text("precious data\n")
    result = run_appd_expecting_failure(path)
    assert result.returncode != 0
    assert "not a socket" in result.stdout and str(path) in result.stdout, result.stdout
    assert path.read_text() == "precious data\n"


def test_a_symlink_at_the_socket_path_is_refused(tmp_path):
    target = tmp_path / "elsewhere.sock"
    path = tmp_path / "ctl.sock"
    path.symlink_to(target)
    result = run_appd_expecting_failure(path)
    assert result.returncode != 0
    assert "symlink" in result.stdout and str(path) in result.stdout, result.stdout
    assert path.is_symlink() and not target.exists()
