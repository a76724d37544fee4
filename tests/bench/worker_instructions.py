#!/usr/bin/env python3
"""User-space instructions per keep-alive request in a gthread worker's serving
threads, counted by valgrind (callgrind): the whole request path as the worker
runs it (epoll wakeup, read, parse, environ, app, response, re-arm), a figure
the machine's load does not move, unlike requests/s or CPU time. appd runs
under valgrind with 1 worker and 1 thread; after 200 requests to warm up, the
counts are zeroed and a client sends --requests requests over 4 kept
connections; callgrind counts only the threads the interpreter
started (the serving threads: the main thread, which accepts and heartbeats,
is left out). APPD_BENCH_BASELINE=/other/checkout counts that appd too (run
with this interpreter, as request_cpu.py does).

    python tests/bench/worker_instructions.py [--requests 2000] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import free_port  # noqa: E402

APPS = Path(__file__).resolve().parent / "apps"
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


def wait_serving(port: int, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"appd under valgrind exited {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(REQUEST.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
                if sock.recv(65536).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            time.sleep(0.5)
    raise SystemExit("appd under valgrind did not serve in time")


def send_requests(port: int, count: int, connections: int = 4) -> None:
    """`count` requests, round robin over kept connections, one in flight on each."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=30) for _ in range(connections)]
    try:
        for i in range(0, count, connections):
            batch = socks[:min(connections, count - i)]
            for sock in batch:
                sock.sendall(REQUEST)
            for sock in batch:
                data = b""
                while not data.endswith(b"\n") or b"\r\n\r\n" not in data:
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise SystemExit("appd closed a kept connection")
                    data += chunk
    finally:
        for sock in socks:
            sock.close()


def count(checkout: Path | None, requests: int, threads: int) -> float:
    """Instructions per request in the serving threads of one appd (this checkout or another)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(APPS))
    with tempfile.TemporaryDirectory(prefix="appd-worker-instructions-") as work:
        work = Path(work)
        if checkout is not None:
            (work / "pkgs").mkdir()
            (work / "pkgs" / "appd").symlink_to(checkout / "daemon")
            (work / "pkgs" / "appdctl").symlink_to(checkout / "ctl")
            env["PYTHONPATH"] = f"{work / 'pkgs'}{os.pathsep}{APPS}"
        port = free_port()
        command = ["valgrind", "--tool=callgrind", "--trace-children=yes",
                   f"--callgrind-out-file={work}/cg.%p", "--toggle-collect=pythread_wrapper",
                   sys.executable, "-m", "appd", "start", "bench_hello:app", "-b", f"127.0.0.1:{port}",
                   "-w", "1", "--worker-class", "gthread", "--threads", str(threads), "--keepalive", "30",
                   "--timeout", "300", "--control-socket", str(work / "ctl.sock"), "--log-level", "warning"]
        proc = subprocess.Popen(command, env=env, cwd=work, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=open(work / "log", "w"))
        try:
            wait_serving(port, proc)
            send_requests(port, 200)  # warm-up (first imports, caches), then counted from zero
            zero_counts(proc.pid)
            send_requests(port, requests)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)  # graceful: callgrind writes its counts at exit
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        totals = [serving_threads_total(path) for path in work.glob("cg.*")]
        return max(totals) / requests  # the worker's file


def zero_counts(root: int) -> None:
    """callgrind_control --zero on every process of that appd (the worker among them)."""
    import psutil
    for child in psutil.Process(root).children(recursive=True):
        subprocess.run(["callgrind_control", "--zero", str(child.pid)], capture_output=True, timeout=60)


def serving_threads_total(path: Path) -> int:
    """The instructions callgrind counted in one process's file (only inside pythread_wrapper)."""
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("totals:") or line.startswith("summary:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind (make bench-deps installs it)")
    kinds = {"appd": None}
    if os.environ.get("APPD_BENCH_BASELINE"):
        kinds["appd-base"] = Path(os.environ["APPD_BENCH_BASELINE"]).resolve()
    figures = {}
    for kind, checkout in kinds.items():
        figures[kind] = count(checkout, args.requests, args.threads)
        print(f"{kind}: {figures[kind] / 1000:.1f}k instructions per keep-alive hello request in the "
              f"serving thread(s) (gthread, {args.threads} thread(s), {args.requests} requests, callgrind)")
    if "appd-base" in figures:
        print(f"appd / appd-base: {figures['appd'] / figures['appd-base']:.2f}×")


if __name__ == "__main__":
    main()
