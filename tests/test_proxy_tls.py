"""The connection layer in front of the app (appd.http.proxy) over real sockets:
client certificates (ca_certs + cert_reqs), PROXY protocol required or from
peers not allowed, the header arriving in pieces."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import subprocess
import time

import pytest

from appd.config import Settings
from appd.http import ServerInfo
from appd.http.proxy import ConnectionSetup, tls_context
from http_harness import read_until_close, serving

PROXY_DEFAULTS = {"forwarded_allow_ips": ["127.0.0.1"], "secure_scheme_headers": {},
                  "forwarder_headers": [], "proxy_allow_ips": ["127.0.0.1"]}


def info(port_hint: str = "0", **cfg) -> ServerInfo:
    cfg = Settings({**PROXY_DEFAULTS, "proxy_protocol": "off", **cfg})
    return ServerInfo("127.0.0.1", port_hint, setup=ConnectionSetup(cfg, tls_context(cfg)))


def self_signed(directory, name: str) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = str(directory / f"{name}.pem"), str(directory / f"{name}.key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-keyout", key, "-out", cert], check=True, capture_output=True, timeout=60)
    return cert, key


def env_over(sock: socket.socket) -> dict:
    sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = read_until_close(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return json.loads(body)


def test_client_certificates_required_by_ca_certs(tmp_path):
    server_cert, server_key = self_signed(tmp_path, "server")
    client_cert, client_key = self_signed(tmp_path, "client")
    setup = info(certfile=server_cert, keyfile=server_key, ca_certs=client_cert, cert_reqs=2)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    with serving(info=setup) as server:
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            with client.wrap_socket(server.connect()) as sock:
                env_over(sock)  # TLS 1.3 reports the refusal on the first read
        client.load_cert_chain(client_cert, client_key)
        with client.wrap_socket(server.connect()) as sock:
            assert env_over(sock)["wsgi.url_scheme"] == "https"


def test_required_proxy_header_missing_closes_without_an_answer():
    with serving(info=info(proxy_protocol="v1")) as server:
        with server.connect() as sock:
            sock.sendall(b"GET /env HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                assert read_until_close(sock) == b""
            except ConnectionResetError:
                pass  # closed with our request unread: a reset is the same refusal
        with server.connect() as sock:
            sock.sendall(b"PROXY TCP6 2001:db8::7 ::1 4000 80\r\n")
            assert env_over(sock)["REMOTE_ADDR"] == "2001:db8::7"


def test_proxy_header_from_a_peer_not_allowed_is_not_believed():
    with serving(info=info(proxy_protocol="auto", proxy_allow_ips=["10.0.0.1"])) as server:
        with server.connect() as sock:
            sock.sendall(b"PROXY TCP4 6.6.6.6 127.0.0.1 1 80\r\nGET /env HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_until_close(sock).startswith(b"HTTP/1.1 400")


def test_proxy_header_split_across_packets():
    with serving(info=info(proxy_protocol="auto")) as server:
        with server.connect() as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(b"PRO")
            time.sleep(0.05)
            sock.sendall(b"XY TCP4 192.0.2.1 127.0.0.1 1234 80\r\n")
            assert env_over(sock)["REMOTE_ADDR"] == "192.0.2.1"


# --- gthread workers: heads of TLS and PROXY connections are read by a thread ---

def _ask(sock, buffer: bytearray, path: str = "/") -> bytes:
    from test_worker_kinds import _read_response
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    return _read_response(sock, buffer)


def test_gthread_serves_tls_kept_alive_and_answers_close_at_upgrade(start_appd, tmp_path):
    cert, key = self_signed(tmp_path, "server")
    appd = start_appd("--worker-class", "gthread", "--threads", "2", "-w", "1", "--keepalive", "30",
                      "--certfile", cert, "--keyfile", key)
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    host, _, port = appd.address.rpartition(":")
    with client.wrap_socket(socket.create_connection((host, int(port)), timeout=10)) as sock:
        buffer = bytearray()
        first, second = _ask(sock, buffer), _ask(sock, buffer)
        assert first.startswith(b"HTTP/1.1 200") and second.startswith(b"HTTP/1.1 200"), (first, second)
        assert b"connection: close" not in second.lower()
        # A TLS session cannot move to the new generation: its next request is
        # answered by the old worker, with close (never a close under the client).
        upgrade = appd.ctl("upgrade", "--no-wait")
        assert upgrade.returncode == 0, upgrade.stderr
        from conftest import wait_until
        wait_until(lambda: any(g["state"] == "draining" for g in appd.status()["generations"]), 20,
                   message="the old generation to drain")
        last = _ask(sock, buffer)
        assert last.startswith(b"HTTP/1.1 200") and b"connection: close" in last.lower(), last


def test_gthread_reads_the_proxy_header_then_keeps_the_connection(start_appd):
    appd = start_appd("--worker-class", "gthread", "--threads", "2", "-w", "1",
                      "--proxy-protocol", "v1", "--proxy-allow-ips", "127.0.0.1", "--forwarded-allow-ips",
                      "127.0.0.1", "--app", "wsgi_samples:env")
    host, _, port = appd.address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"PROXY TCP4 203.0.113.7 127.0.0.1 40000 80\r\n")
        buffer = bytearray()
        for _ in range(2):
            answer = _ask(sock, buffer)
            assert answer.startswith(b"HTTP/1.1 200") and b"203.0.113.7" in answer, answer
