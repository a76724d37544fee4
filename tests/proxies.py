"""Real load balancers in front of appd, as production runs it: nginx with an
`upstream { keepalive 16; }` pool and HAProxy with `http-reuse always`, each
started here on loopback from a config generated in a scratch directory,
and stopped (with everything it started) on the way out.

    with running_proxy("nginx", tmp_path, appd.address) as proxy:
        figures = operate_through(appd, proxy.address, upgrades=20, reloads=20)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from helpers import free_port

from conftest import http_get, wait_until
from loadgen import KeepAliveLoad

PROXIES = ("nginx", "haproxy")
_SBIN = ":/usr/sbin:/sbin:/usr/local/sbin"


def find(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + _SBIN)


def nginx_config(scratch: Path, port: int, upstream: str) -> str:
    # One foreground process (no master/worker split): no switch to another user
    # when run as root, so every path can live in the scratch directory.
    temps = "\n".join(f"    {kind}_temp_path {scratch / kind};"
                      for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""daemon off;
master_process off;
worker_processes 1;
pid {scratch / 'nginx.pid'};
error_log {scratch / 'error.log'} warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    upstream appd {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://appd;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


def haproxy_config(scratch: Path, port: int, upstream: str) -> str:
    return f"""global
    maxconn 1000
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 30s
frontend front
    bind 127.0.0.1:{port}
    default_backend appd
backend appd
    http-reuse always
    server appd {upstream}
"""


def command(name: str, binary: str, scratch: Path, config: Path) -> list[str]:
    if name == "nginx":
        return [binary, "-p", str(scratch), "-c", str(config), "-e", str(scratch / "error.log")]
    return [binary, "-db", "-f", str(config)]


@dataclass
class Proxy:
    name: str
    address: str
    proc: subprocess.Popen
    log: Path


@contextlib.contextmanager
def running_proxy(name: str, directory: Path, upstream, make_config=None):
    """`name` (nginx or haproxy) on a free loopback port, in front of `upstream`
    (make_config(scratch, port, upstream) -> text: another configuration than ours)."""
    binary = find(name)
    if binary is None:
        raise FileNotFoundError(f"{name} is not installed")
    scratch = directory / name
    scratch.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = scratch / f"{name}.conf"
    make = make_config or (nginx_config if name == "nginx" else haproxy_config)
    config.write_text(make(scratch, port, upstream))
    log = scratch / "output.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command(name, binary, scratch, config), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    proxy = Proxy(name, f"127.0.0.1:{port}", proc, log)
    try:
        wait_until(lambda: _answers(proxy), 15, message=f"{name} to answer on port {port}")
        yield proxy
    finally:
        _stop(proc)


def _answers(proxy: Proxy) -> bool:
    if proxy.proc.poll() is not None:
        raise AssertionError(f"{proxy.name} exited with {proxy.proc.returncode}: {proxy.log.read_text()}")
    return http_get(proxy.address, timeout=2)[0] == 200


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def operate_through(appd, address: str, upgrades: int, reloads: int, clients: int = 8) -> dict:
    """Keep-alive load through `address` while upgrades and reloads alternate;
    the figures: requests, 5xx answers, other failures, operations, seconds."""
    operations = []
    for i in range(max(upgrades, reloads)):  # alternating
        operations += (["upgrade"] if i < upgrades else []) + (["reload"] if i < reloads else [])
    started = time.monotonic()
    with KeepAliveLoad(address, clients=clients, max_seconds=600) as load:
        for op in operations:
            result = appd.ctl(op)
            if result.returncode != 0:
                raise AssertionError(f"appdctl {op} failed: {result.stdout}{result.stderr}")
        load.wait_for(clients * 4)
    results = load.snapshot()
    server_errors = [r for r in results if r.status is not None and r.status >= 500]
    return {"requests": len(results), "5xx": len(server_errors), "failures": load.failures,
            "operations": len(operations), "seconds": time.monotonic() - started,
            "reconnects": load.reconnects, "report": load.report()}
