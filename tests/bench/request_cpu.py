#!/usr/bin/env python3
"""CPU time of appd's HTTP layer per request, without the worker loop: the
server side runs appd.http.handle_connection in this process (a hello app),
a forked client sends the requests over loopback; the figure is this process's
user + system CPU per request, which a busy machine disturbs far less than
requests/s. Runs alternate between this checkout and APPD_BENCH_BASELINE's
(or, with --pure-baseline, this checkout with APPD_PURE_PYTHON=1: the compiled
appd.http against its sources). --instructions counts user-space instructions
per request under valgrind instead: steady on a loaded machine, but blind to
the kernel's share (the socket calls).

    python tests/bench/request_cpu.py [--requests 20000] [--rounds 5] [--keepalive]
                                      [--pure-baseline] [--instructions]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
REQUEST = b"GET /hello?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def hello(environ, start_response):
    body = b"Hello, world!\n"
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def client(port: int, count: int, keepalive: bool) -> None:
    def one(sock):
        sock.sendall(REQUEST)
        data = b""
        while b"Hello, world!\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit("server closed early")
            data += chunk
    if keepalive:
        with socket.create_connection(("127.0.0.1", port)) as sock:
            for _ in range(count):
                one(sock)
    else:
        for _ in range(count):
            with socket.create_connection(("127.0.0.1", port)) as sock:
                one(sock)


def serve(count: int, keepalive: bool) -> float:
    """Serve `count` requests; the server's CPU µs per request."""
    from appd.http import ServerInfo, handle_connection
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    info = ServerInfo(server_name="127.0.0.1", server_port=str(port))
    pid = os.fork()
    if pid == 0:
        try:
            client(port, count, keepalive)
        finally:
            os._exit(0)
    before = resource.getrusage(resource.RUSAGE_SELF)
    served = 0
    while served < count:
        conn, addr = listener.accept()
        served += handle_connection(conn, addr, hello, info, keepalive=5.0 if keepalive else 0.0)
        conn.close()
    after = resource.getrusage(resource.RUSAGE_SELF)
    os.waitpid(pid, 0)
    listener.close()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return cpu / count * 1e6


def run_child(checkout: Path | None, count: int, keepalive: bool, pure: bool = False,
              prefix: tuple = ()) -> dict:
    env = dict(os.environ)
    if pure:
        env["APPD_PURE_PYTHON"] = "1"
    if checkout is not None:  # that checkout's appd first on the path
        packages = Path(f"/tmp/appd-request-cpu-{os.getpid()}")
        packages.mkdir(exist_ok=True)
        link = packages / "appd"
        if not link.exists():
            link.symlink_to(checkout / "daemon")
        env["PYTHONPATH"] = str(packages)
    out = subprocess.run([*prefix, sys.executable, __file__, "--child", "--requests", str(count)]
                         + (["--keepalive"] if keepalive else []),
                         env=env, capture_output=True, text=True, timeout=600, check=True)
    return json.loads(out.stdout)


def instructions(checkout: Path | None, count: int, keepalive: bool, pure: bool) -> tuple[float, str]:
    """User-space instructions per request in the server process (valgrind): serving
    3×count requests minus serving count, so start-up and imports cancel out. A
    busy machine does not change it; kernel work (the sockets) is not in it."""
    totals, impl = [], "python"
    for n in (count, 3 * count):
        with tempfile.TemporaryDirectory(prefix="appd-request-cpu-") as logs:
            impl = run_child(checkout, n, keepalive, pure, prefix=(
                "valgrind", "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
                f"--log-file={logs}/%p"))["http_impl"]
            totals.append(server_instructions(Path(logs)))
    return (totals[1] - totals[0]) / (2 * count), impl


def server_instructions(logs: Path) -> int:
    """From valgrind's per-process logs, the server's (forked clients log too)."""
    for log in logs.iterdir():
        text = log.read_text()
        if re.search(rf"Parent PID: {os.getpid()}\b", text):
            return int(re.search(r"I\s+refs:\s+([\d,]+)", text).group(1).replace(",", ""))
    raise SystemExit(f"no valgrind log of the server process in {logs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=None, help="default 20000 (1000 with --instructions)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument("--pure-baseline", action="store_true",
                        help="the baseline is this checkout's appd.http as pure Python (APPD_PURE_PYTHON=1)")
    parser.add_argument("--instructions", action="store_true",
                        help="count user-space instructions per request under valgrind instead (one round)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        serve(100, args.keepalive)  # warm-up: caches, first imports
        import appd.http
        print(json.dumps({"us_per_request": serve(args.requests or 20000, args.keepalive),
                          "http_impl": getattr(appd.http, "IMPL", "python")}))
        return
    baseline = os.environ.get("APPD_BENCH_BASELINE")
    kinds = {"appd": (None, False)}  # name: (checkout, pure)
    if args.pure_baseline:
        kinds["appd-base"] = (None, True)
    elif baseline:
        kinds["appd-base"] = (Path(baseline).resolve(), False)
    mode = "keep-alive" if args.keepalive else "a connection per request"
    if args.instructions:
        figures = count_instructions(kinds, args.requests or 1000, args.keepalive, mode)
    else:
        figures = measure_cpu(kinds, args.requests or 20000, args.rounds, args.keepalive, mode)
    if "appd-base" in kinds:
        print(f"appd / appd-base: {figures['appd'] / figures['appd-base']:.2f}×")


def measure_cpu(kinds: dict, count: int, rounds: int, keepalive: bool, mode: str) -> dict:
    """Rounds alternating between the kinds; {kind: median µs CPU per request}."""
    results = {kind: [] for kind in kinds}
    impls = {}  # appd.http compiled or pure Python (APPD_PURE_PYTHON=1), as each child said
    for _ in range(rounds):
        for kind, (checkout, pure) in kinds.items():
            child = run_child(checkout, count, keepalive, pure)
            results[kind].append(child["us_per_request"])
            impls[kind] = child["http_impl"]
    medians = {}
    for kind, values in results.items():
        values.sort()
        medians[kind] = values[len(values) // 2]
        print(f"{kind} ({impls[kind]}): {medians[kind]:.1f} µs CPU per request (median of {len(values)}, "
              f"{mode}; all: {', '.join(f'{v:.1f}' for v in values)})")
    return medians


def count_instructions(kinds: dict, count: int, keepalive: bool, mode: str) -> dict:
    """{kind: user-space instructions per request}; one run each (the count is steady)."""
    figures = {}
    for kind, (checkout, pure) in kinds.items():
        figures[kind], impl = instructions(checkout, count, keepalive, pure)
        print(f"{kind} ({impl}): {figures[kind] / 1000:.1f}k user-space instructions per request "
              f"(valgrind, {mode})")
    return figures


if __name__ == "__main__":
    t0 = time.monotonic()
    main()
