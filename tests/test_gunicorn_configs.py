"""Real-world gunicorn.conf.py files (tests/gunicorn_configs/) start under appd
unchanged (`appd start -c gunicorn.conf.py`), serve, and survive `appdctl
upgrade`. The harness adds --bind 127.0.0.1:0, which outranks the file's bind
as a command-line flag does under gunicorn."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import psutil
import pytest

from conftest import Background, http_get, wait_until

CONFIGS = Path(__file__).resolve().parent / "gunicorn_configs"


def conf(name: str) -> str:
    return str(CONFIGS / f"{name}.conf.py")


def get_json(appd, path: str = "/", headers: dict | None = None) -> dict:
    status, _, body = http_get(appd.address, path, headers=headers or {})
    assert status == 200, body
    return json.loads(body)


def upgrade_and_serve(appd) -> dict:
    result = appd.ctl("upgrade")
    assert result.returncode == 0, result.stdout + result.stderr
    return get_json(appd)


def markers(directory: Path, hook: str) -> list[list[str]]:
    path = directory / hook
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_django_style_gthread_config(start_appd, tmp_path):
    env = {"MARKERS": str(tmp_path)}
    appd = start_appd("-c", conf("django_gthread"), "--post-fork", "gunicorn_apps:appd_style_post_fork",
                      env=env)
    status = appd.status()
    assert status["target_workers"] == 3
    first = get_json(appd)
    assert first["env"]["DJANGO_SETTINGS_MODULE"] == "shop.settings.production"  # raw_env
    assert first["multithread"] is True  # gthread
    old_workers = {w["pid"] for w in appd.serving_generation()["workers"]}
    # appd's own one-argument post_fork still gets appd's Worker
    assert sorted(int(m[1]) for m in markers(tmp_path, "appd_post_fork")) == [1, 2, 3]
    after = upgrade_and_serve(appd)
    assert after["pid"] not in old_workers
    wait_until(lambda: {int(m[0]) for m in markers(tmp_path, "child_exit")} >= old_workers,
               message="child_exit for every worker of the old generation")
    assert "worker %s exited" % sorted(old_workers)[0] in appd.log()  # server.log adapter


def make_cert(directory: Path, name: str) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", str(directory / "key.pem"),
                    "-out", str(directory / "cert.pem")], check=True, capture_output=True, timeout=60)


def tls_request(address: str, preface: bytes = b"", headers: str = "") -> tuple[dict, bytes]:
    """GET / over TLS, after an optional PROXY header in the clear; (JSON body, server cert)."""
    host, _, port = address.rpartition(":")
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=10) as raw:
        raw.sendall(preface)
        with context.wrap_socket(raw) as sock:
            cert = sock.getpeercert(binary_form=True)
            sock.sendall(f"GET / HTTP/1.1\r\nHost: shop.example\r\n{headers}Connection: close\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body), cert


def proxy_v2(source: str, port: int) -> bytes:
    addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + struct.pack("!HH", port, 443)
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, 0x11]) + struct.pack("!H", len(addresses)) + addresses


def test_flask_behind_tls_proxy(start_appd, tmp_path):
    make_cert(tmp_path, "first")
    access = tmp_path / "access.log"
    appd = start_appd("-c", conf("flask_behind_tls_proxy"), env={"CERTS": str(tmp_path), "ACCESS_LOG": str(access)})
    # the proxy says https and who the client is: Flask builds https URLs and sees the client
    body, first_cert = tls_request(appd.address, headers="X-Forwarded-Proto: https\r\n"
                                   "X-Forwarded-For: 203.0.113.9\r\nX-Request-Id: req-42\r\n")
    assert body == {"external_url": "https://shop.example/", "remote_addr": "203.0.113.9", "scheme": "https"}
    # PROXY protocol v1 and v2 (before the TLS handshake) name the client too
    assert tls_request(appd.address, b"PROXY TCP4 198.51.100.4 127.0.0.1 5555 443\r\n")[0]["remote_addr"] \
        == "198.51.100.4"
    assert tls_request(appd.address, proxy_v2("192.0.2.77", 6000))[0]["remote_addr"] == "192.0.2.77"
    wait_until(lambda: "req-42" in access.read_text(), message="the access log line")
    line = next(l for l in access.read_text().splitlines() if "req-42" in l)
    assert line.startswith('203.0.113.9 - - [') and '"GET / HTTP/1.1" 200' in line
    # a renewed certificate is served after a reload, without a restart
    make_cert(tmp_path, "renewed")
    result = appd.ctl("reload")
    assert result.returncode == 0, result.stdout + result.stderr
    assert tls_request(appd.address)[1] != first_cert
    assert appd.ctl("upgrade").returncode == 0
    assert tls_request(appd.address)[0]["scheme"] == "https"


def test_logconfig_dict_and_capture_output(start_appd, tmp_path):
    env = {"ERROR_LOG": str(tmp_path / "error.log"), "APP_LOG": str(tmp_path / "app.log")}
    appd = start_appd("-c", conf("logconfig"), env=env)
    get_json(appd, "/log?id=7")
    wait_until(lambda: "INFO shop.orders order placed id=7" in (tmp_path / "app.log").read_text(),
               message="the app's log record in logconfig_dict's file")
    wait_until(lambda: "printed by the app" in (tmp_path / "error.log").read_text(),
               message="the app's print in error_log (capture_output)")
    upgrade_and_serve(appd)


def readable_by_nobody(path: str) -> bool:
    """Every directory above `path` is searchable by others (nobody must load Python from it)."""
    path = os.path.realpath(path)
    while path != "/":
        path = os.path.dirname(path)
        if not os.stat(path).st_mode & 0o001:
            return False
    return True


def python_for_nobody() -> tuple[str, dict] | None:
    """An interpreter nobody can run with this venv's packages: ours, or the system's of the
    same version (ours may live under /root) with our site-packages on PYTHONPATH."""
    if readable_by_nobody(os.__file__):
        return sys.executable, {}
    system = f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}"
    site = sysconfig.get_path("purelib")
    if os.path.exists(system) and readable_by_nobody(site + "/x"):
        return system, {"PYTHONPATH": site}
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root")
def test_user_and_group_when_started_as_root(start_appd):
    found = python_for_nobody()
    if found is None:
        pytest.skip("no Python that the nobody user can read (appd refuses that with a clear error)")
    python, env = found
    appd = start_appd("-c", conf("run_as_nobody"), "--python", python, env=env)
    body = get_json(appd)
    assert (body["uid"], body["gid"], body["umask"]) == (65534, 65534, 0o027)
    assert psutil.Process(appd.pid).uids().real == 0  # the daemon keeps root (listeners, socket)
    master = psutil.Process(appd.serving_generation()["master_pid"])
    assert master.uids().real == 65534 and "shop-web" in " ".join(master.cmdline())
    assert upgrade_and_serve(appd)["uid"] == 65534


def test_most_hooks_are_called_at_gunicorn_moments(start_appd, tmp_path):
    appd = start_appd("-c", conf("hooks_everywhere"), env={"MARKERS": str(tmp_path)})
    first_master = appd.serving_generation()["master_pid"]
    status, _, _ = http_get(appd.address, "/orders?page=2", headers={"X-Trace": "abc"})
    assert status == 200
    wait_until(lambda: markers(tmp_path, "post_request"), message="post_request")
    assert markers(tmp_path, "pre_request")[0][1:] == ["GET", "/orders", "page=2", "abc"]
    assert markers(tmp_path, "post_request")[0][1:] == ["/orders", "200", "GET"]
    assert [m[1] for m in markers(tmp_path, "on_starting")] == [str(first_master)]
    assert markers(tmp_path, "when_ready")[0][1:] == ["2"]
    assert sorted(m[1] for m in markers(tmp_path, "pre_fork")) == ["1", "2"]
    assert sorted(m[2] for m in markers(tmp_path, "post_fork")) == ["1", "2"]
    assert all(m[3] == str(first_master) for m in markers(tmp_path, "post_fork"))
    assert len(markers(tmp_path, "post_worker_init")) == 2
    assert markers(tmp_path, "nworkers_changed")[0][1:] == ["2", "None"]
    assert appd.ctl("scale", "3").returncode == 0
    assert ["3", "2"] in [m[1:] for m in markers(tmp_path, "nworkers_changed")]
    assert appd.ctl("reload").returncode == 0
    assert markers(tmp_path, "on_reload")
    assert not markers(tmp_path, "pre_exec")
    old_workers = {w["pid"] for w in appd.serving_generation()["workers"]}
    upgrade_and_serve(appd)
    assert len(markers(tmp_path, "pre_exec")) == 1
    wait_until(lambda: [m[0] for m in markers(tmp_path, "on_exit")] == [str(first_master)],
               message="on_exit of the old master")
    exited = {int(m[0]) for m in markers(tmp_path, "worker_exit")}
    assert old_workers <= exited and old_workers <= {int(m[1]) for m in markers(tmp_path, "child_exit")}
    serving = {w["pid"] for w in appd.serving_generation()["workers"]}
    assert appd.ctl("stop").returncode == 0  # quick stop: SIGQUIT, gunicorn's worker_int
    appd.proc.wait(20)
    assert serving <= {int(m[0]) for m in markers(tmp_path, "worker_int")}


def test_worker_abort_when_the_master_times_a_worker_out(start_appd, tmp_path):
    appd = start_appd("-c", conf("hooks_everywhere"), "-w", "1", "--timeout", "3",
                      env={"MARKERS": str(tmp_path)})
    (hung,) = {w["pid"] for w in appd.serving_generation()["workers"]}
    request = Background(appd.address, "/hang", timeout=30)
    wait_until(lambda: [m[0] for m in markers(tmp_path, "worker_abort")] == [str(hung)], timeout=30,
               message="worker_abort in the hung worker")
    request.join()
    # The client sees the connection close as the worker dies; the master reaps it just after.
    wait_until(lambda: str(hung) in {m[1] for m in markers(tmp_path, "child_exit")}, timeout=10,
               message="child_exit in the master for the hung worker")


def test_prometheus_multiprocess_with_child_exit(start_appd, tmp_path):
    metrics_dir = tmp_path / "metrics"
    appd = start_appd("-c", conf("prometheus"), env={"METRICS_DIR": str(metrics_dir)})
    for _ in range(6):
        assert http_get(appd.address, "/")[0] == 200
    status, _, text = http_get(appd.address, "/metrics")
    assert status == 200 and b"shop_requests_total 6.0" in text
    workers = [w["pid"] for w in appd.serving_generation()["workers"]]
    assert (metrics_dir / f"gauge_livesum_{workers[0]}.db").exists()
    assert appd.ctl("retire", str(workers[0])).returncode == 0
    # child_exit -> mark_process_dead removes the dead worker's live gauge
    wait_until(lambda: not (metrics_dir / f"gauge_livesum_{workers[0]}.db").exists(),
               message="mark_process_dead for the retired worker")
    assert http_get(appd.address, "/")[0] == 200
    assert appd.ctl("upgrade").returncode == 0
    assert http_get(appd.address, "/")[0] == 200
