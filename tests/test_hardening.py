"""The control path cannot be spoofed and each child gets exactly what its
protocol names (issue 14): private default socket directory, appdctl checking
who listens, no symlink following for the pidfile and sockets, socket
activation served as given, command workers without appd's private fds and
variables, accept errors that pause rather than kill, upgrade --daemon that
never reads the config file."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import APPD, APPDCTL, APPS, assert_no_leftovers, copy_of_appd, http_get, wait_until
from helpers import free_port

pytestmark = pytest.mark.timeout(120)
NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another uid")
needs_activate = pytest.mark.skipif(not shutil.which("systemd-socket-activate"),
                                    reason="systemd-socket-activate not installed")


def appd_refusing(args: list[str], env: dict | None = None, timeout: float = 20.0) -> subprocess.CompletedProcess:
    """`appd start ...` that must refuse to start; stopped (and failed) if it serves instead."""
    proc = subprocess.Popen([APPD, "start", *args], cwd=APPS, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
        raise AssertionError(f"appd started instead of refusing:\n{out}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


# --- the default control socket directory ---

@pytest.fixture
def runtime_dir():
    """A directory standing in for XDG_RUNTIME_DIR, so appd uses its default socket path there."""
    path = Path(tempfile.mkdtemp(prefix="test-xdg-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("problem", ["group_bits", "symlink", "other_owner"])
def test_default_socket_directory_must_be_private(runtime_dir, problem):
    if problem == "other_owner" and os.geteuid() != 0:
        pytest.skip("needs root to chown")
    real = runtime_dir / "real"
    real.mkdir(mode=0o700)
    xdg = runtime_dir / "xdg"
    if problem == "symlink":
        xdg.symlink_to(real)
    else:
        xdg.mkdir(mode=0o700)
        os.chmod(xdg, 0o770 if problem == "group_bits" else 0o700)
        if problem == "other_owner":
            os.chown(xdg, NOBODY, NOBODY)
    result = appd_refusing(["--bind", "127.0.0.1:0"], env={"XDG_RUNTIME_DIR": str(xdg)})
    assert result.returncode == 1, result.stdout
    assert f"control socket directory {xdg}" in result.stdout, result.stdout
    assert not (real / "appd.sock").exists() and not (xdg / "appd.sock").exists()


# --- appdctl checks who it talks to ---

def _fake_server_as_nobody(path: Path):
    """A child running as nobody listening on `path`; returns (pid, read end that reports bytes received)."""
    ready_r, ready_w = os.pipe()
    got_r, got_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(str(path))
            sock.listen(1)
            os.write(ready_w, b"1")
            sock.settimeout(15)
            conn, _ = sock.accept()
            conn.settimeout(2)
            received = b""
            try:
                while chunk := conn.recv(4096):
                    received += chunk
            except OSError:
                pass
            os.write(got_w, str(len(received)).encode())
        finally:
            os._exit(0)
    os.close(ready_w)
    os.close(got_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid, got_r


@pytest.fixture
def open_dir():
    """A directory another uid can reach (pytest's tmp_path is 0700 under root's)."""
    path = Path(tempfile.mkdtemp(prefix="test-open-"))
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_appdctl_sends_nothing_to_a_socket_held_by_another_user(open_dir):
    path = open_dir / "ctl.sock"
    pid, got = _fake_server_as_nobody(path)
    try:
        result = subprocess.run([APPDCTL, "--socket", str(path), "upgrade", "--env", "DB_PASSWORD=secret"],
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 4, result
        assert "permission_denied" in result.stderr and f"uid {NOBODY}" in result.stderr
        assert os.read(got, 16) == b"0", "not one byte reached the impostor"
    finally:
        os.waitpid(pid, 0)
        os.close(got)


# --- upgrade --env: LD_* and PYTHON* only for root and the daemon's own user ---

@needs_root
def test_ld_and_python_env_refused_for_other_allowed_users(start_appd, open_dir):
    from appdctl import protocol
    import msgpack
    directory = open_dir
    appd = start_appd("-w", "1", "--control-socket", str(directory / "ctl.sock"), "--control-socket-mode",
                      "0666", "--control-allow-uids", str(NOBODY), wait=False)
    appd.socket = str(directory / "ctl.sock")
    appd.wait_ready()
    replies = {}
    for name in ("LD_PRELOAD", "PYTHONPATH", "python_startup", "SAFE"):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child: a control client as nobody
            try:
                os.setgid(NOBODY)
                os.setuid(NOBODY)
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(20)
                sock.connect(appd.socket)
                # "wait": False: the allowed one is only started, so the test stays short
                sock.sendall(protocol.encode({"v": 1, "id": 1, "cmd": "upgrade",
                                              "args": {"env": {name: "/tmp/x"}, "wait": False}}))
                decoder = protocol.FrameDecoder()
                while True:
                    messages = [m for m in decoder.feed(sock.recv(65536)) if "event" not in m]
                    if messages:
                        os.write(w, msgpack.packb(messages[0]))
                        break
            finally:
                os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        with os.fdopen(r, "rb") as f:
            replies[name] = msgpack.unpackb(f.read())
        if name == "SAFE":
            wait_until(lambda: appd.status()["operation"] is None, 60, message="the upgrade to end")
    for name in ("LD_PRELOAD", "PYTHONPATH", "python_startup"):
        assert replies[name]["error"]["code"] == "permission_denied", replies[name]
        assert name in replies[name]["error"]["message"]
    assert replies["SAFE"]["ok"], replies["SAFE"]
    # Root (the daemon's own uid here) may set them.
    assert appd.ctl("upgrade", "--env", "PYTHONDONTWRITEBYTECODE=1").returncode == 0


# --- files: no symlink is followed ---

def test_pidfile_temp_symlink_is_not_followed(start_appd, tmp_path):
    pidfile = tmp_path / "appd.pid"
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    appd = start_appd("-w", "1", "--pidfile", str(pidfile))
    assert pidfile.read_text().strip() == str(appd.pid)
    (tmp_path / f"appd.pid.{appd.pid}.tmp").symlink_to(target)
    result = appd.ctl("upgrade", "--daemon")  # the new image writes the pidfile again
    assert result.returncode == 0, result.stderr
    assert target.read_text() == "keep me\n", "the planted symlink's target was overwritten"
    assert pidfile.read_text().strip() == str(appd.pid) and not pidfile.is_symlink()


def test_stale_unix_listener_is_replaced_with_unix_socket_mode(start_appd, tmp_path):
    path = tmp_path / "app.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays; nobody listens
    os.chmod(path, 0o700)
    appd = start_appd("-w", "1", "--bind", f"unix:{path}", "--unix-socket-mode", "0660")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
    assert http_get(f"unix:{path}")[0] == 200
    appd.stop()
    assert not path.exists(), "a path appd bound itself is removed at exit"


def test_busy_live_unix_listener_is_neither_replaced_nor_waited_for(tmp_path):
    path = tmp_path / "app.sock"
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(0)
    queued = []
    try:
        while True:  # fill its backlog: a further connect() would block
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            queued.append(client)
            client.connect(str(path))
    except BlockingIOError:
        pass
    try:
        result = appd_refusing(["--bind", f"unix:{path}", "--control-socket", str(tmp_path / "ctl.sock")])
        assert result.returncode == 1, result.stdout
        assert "may be in use" in result.stdout and str(path) in result.stdout, result.stdout
        assert stat.S_ISSOCK(os.lstat(path).st_mode), "a live owner's socket is never unlinked"
    finally:
        for client in queued:
            client.close()
        live.close()


# --- socket activation ---

def _activated(tmp_path, listen: list[str], *args: str) -> subprocess.Popen:
    ctl = str(tmp_path / "ctl.sock")
    passed = ["-E", "PYTHONPATH"] if "PYTHONPATH" in os.environ else []  # it passes no environment by default
    cmd = ["systemd-socket-activate", *passed, *(f"-l{address}" for address in listen), "--fdname=web",
           APPD, "start", "-w", "1", "--control-socket", ctl, *args]
    return subprocess.Popen(cmd, cwd=APPS, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


@needs_activate
def test_socket_activation_without_bind_serves_the_activated_sockets(tmp_path):
    port = free_port()
    unix_path = tmp_path / "web.sock"
    proc = _activated(tmp_path, [f"127.0.0.1:{port}", str(unix_path)])
    seen = {proc.pid}
    try:
        wait_until(lambda: unix_path.exists(), 10, message="systemd-socket-activate to listen")
        status, _, body = http_get(f"127.0.0.1:{port}", "/", timeout=20)  # starts appd
        assert status == 200, body
        assert http_get(f"unix:{unix_path}", "/")[0] == 200
        from appdctl import Client
        with Client(str(tmp_path / "ctl.sock")) as client:
            listeners = client.call("status")["listeners"]
            assert sorted(l["fd"] for l in listeners) == [3, 4], listeners
            seen.update(w["pid"] for g in client.call("status")["generations"] for w in g["workers"])
            client.call("reload")  # the activated sockets stay what is served
            assert client.call("status")["listeners"] == listeners
            seen.update(w["pid"] for g in client.call("status")["generations"] for w in g["workers"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        assert_no_leftovers(seen)
    assert proc.returncode == 0, out
    assert unix_path.exists(), "systemd's unix socket is not appd's to unlink"


@needs_activate
def test_activated_unix_socket_matched_by_bind_is_not_unlinked(tmp_path):
    path = tmp_path / "web.sock"
    proc = _activated(tmp_path, [str(path)], "--bind", f"unix:{path}")
    seen = {proc.pid}
    try:
        wait_until(lambda: path.exists(), 10, message="systemd-socket-activate to listen")
        assert http_get(f"unix:{path}", "/", timeout=20)[0] == 200
        from appdctl import Client
        with Client(str(tmp_path / "ctl.sock")) as client:
            status = client.call("status")
            assert [l["fd"] for l in status["listeners"]] == [3]
            seen.update(w["pid"] for g in status["generations"] for w in g["workers"])
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        out = proc.communicate(timeout=20)[0]
        assert_no_leftovers(seen)
    assert proc.returncode == 0, out
    assert path.exists(), "systemd's unix socket is not appd's to unlink"


@needs_activate
def test_explicit_bind_with_an_unmatched_activated_socket_is_refused(tmp_path):
    port, other = free_port(), free_port()
    proc = _activated(tmp_path, [f"127.0.0.1:{port}"], "--bind", f"127.0.0.1:{other}")
    try:
        wait_until(lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close() or True, 10,
                   message="systemd-socket-activate to listen")
        out = proc.communicate(timeout=20)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
    assert proc.returncode == 1, out
    assert "match no bind address" in out and f"127.0.0.1:{port}" in out, out


# --- command workers get exactly the socket-activation protocol ---

PROBE = textwrap.dedent("""\
    import os, sys, time
    fds = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds[int(fd)] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            pass
    sockets = sorted(fd for fd, target in fds.items() if target.startswith("socket:"))
    appd_vars = sorted(k for k in os.environ if k.startswith("APPD_"))
    with open(sys.argv[1], "w") as f:
        f.write(f"{sockets}\\n{appd_vars}\\n{os.environ.get('LISTEN_FDS')}\\n")
    time.sleep(600)
""")


def test_command_worker_gets_only_its_listeners_and_variables(start_appd, tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    report = tmp_path / "report"
    appd = start_appd("--worker-class", "command", "--command", f"{sys.executable} {script} {report}",
                      "-w", "1", "--ready-delay", "0.5")
    text = wait_until(lambda: report.exists() and report.read_text().count("\n") == 3 and report.read_text(),
                      10, message="the command worker's report")
    sockets, appd_vars, listen_fds = text.splitlines()
    assert sockets == "[3]", f"one socket, the listener at fd 3, got {sockets}"
    for private in ("APPD_FDS", "APPD_FD_NAMES", "APPD_CHANNEL_FD", "APPD_DAEMON_PID", "APPD_GENERATION"):
        assert f"'{private}'" not in appd_vars, appd_vars
    assert "'APPD_WORKER_GENERATION'" in appd_vars
    assert listen_fds == "1"
    assert appd.status()["daemon"]["pid"] == appd.pid


# --- accept errors and the open files limit ---

def _prlimit(pid: int, nofile: int) -> None:
    import resource
    hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)[1]
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (nofile, hard))  # the soft limit only: undoable


def _lowest_free_fd(pid: int) -> int:
    """RLIMIT_NOFILE bounds fd numbers: at this limit the next open() fails with EMFILE."""
    used = {int(fd) for fd in os.listdir(f"/proc/{pid}/fd")}
    return next(n for n in range(len(used) + 1) if n not in used)


@pytest.mark.parametrize("worker_class", ["sync", "gthread"])
def test_worker_out_of_descriptors_pauses_accepting_and_recovers(start_appd, worker_class):
    appd = start_appd("-w", "1", "--worker-class", worker_class)
    worker = appd.serving_generation()["workers"][0]["pid"]
    import resource
    original = resource.prlimit(worker, resource.RLIMIT_NOFILE)
    _prlimit(worker, _lowest_free_fd(worker))  # the next accept() fails with EMFILE
    try:
        with socket.create_connection(tuple_of(appd.address), timeout=10) as waiting:
            waiting.sendall(b"GET / HTTP/1.0\r\n\r\n")
            wait_until(lambda: "accept_failed" in appd.log(), 10, message="the accept error to be logged")
            assert "Too many open files" in appd.log()
            resource.prlimit(worker, resource.RLIMIT_NOFILE, original)
            waiting.settimeout(10)
            assert waiting.recv(100).startswith(b"HTTP/1.1 200"), "the waiting connection is served"
    finally:
        try:
            resource.prlimit(worker, resource.RLIMIT_NOFILE, original)
        except OSError:
            pass
    assert appd.serving_generation()["workers"][0]["pid"] == worker, "the worker survived"
    assert appd.get("/")[0] == 200


def tuple_of(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_worker_connections_capped_by_the_open_files_limit(start_appd, tmp_path):
    wrapper = tmp_path / "appd-limited"
    wrapper.write_text(f"#!/bin/sh\nulimit -n 128\nexec {APPD} \"$@\"\n")
    wrapper.chmod(0o755)
    import conftest
    saved = conftest.APPD
    conftest.APPD = str(wrapper)
    try:
        appd = start_appd("-w", "1", "--worker-class", "gthread", "--threads", "2",
                          "--worker-connections", "1000")
    finally:
        conftest.APPD = saved
    # Not "worker_connections_capped" alone: the test's own tmp path contains those words.
    wait_until(lambda: "rlimit_nofile=128" in appd.log().replace(" ", "").replace("'", ""), 10,
               message="the cap warning naming the limit")
    assert "worker_connections_capped" in appd.log()
    assert appd.get("/")[0] == 200


# --- upgrade --daemon never reads the config file ---

def test_daemon_reexec_with_an_invalid_config_on_disk_keeps_serving(start_appd, tmp_path):
    config = tmp_path / "appd.toml"
    config.write_text("workers = 1\n")
    appd = start_appd("--config", str(config))
    before = appd.status()
    config.write_bytes(b"workers = [[[ this is not toml\n")
    result = appd.ctl("upgrade", "--daemon")
    assert result.returncode == 0, result.stderr
    after = appd.status()
    assert after["daemon"]["pid"] == appd.pid and after["listeners"] == before["listeners"]
    assert [g["id"] for g in after["generations"]] == [g["id"] for g in before["generations"]]
    assert appd.get("/")[0] == 200


def test_daemon_reexec_refused_when_the_new_code_cannot_parse_its_arguments(start_appd, tmp_path):
    pkg = copy_of_appd(tmp_path)
    appd = start_appd("--ready-delay", "1", "-w", "1", env={"PYTHONPATH": str(pkg)})
    with open(pkg / "appd" / "config.py", "a") as f:  # the new code dropped a flag we were started with
        f.write("\nSETTINGS = [s for s in SETTINGS if s.name != 'ready_delay']\n")
    result = appd.ctl("upgrade", "--daemon")
    assert result.returncode == 1, result
    assert "old daemon keeps running" in result.stderr and "--ready-delay" in result.stderr, result.stderr
    status = appd.status()
    assert status["daemon"]["pid"] == appd.pid and status["daemon"]["state"] == "running"
    assert appd.get("/")[0] == 200
