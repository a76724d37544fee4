#!/usr/bin/env python3
"""Where a worker spends its time under load: py-spy samples one worker
while wrk drives it, then the shares of appd's own code, the socket calls and
the app are printed, with the hottest frames.

    python tests/bench/hotpath.py [--app hello|flask] [--worker sync|gthread] [--seconds 10]

The request path should show mostly the socket calls (accept, recv, sendall,
close): those are the kernel's work; appd's own share is ours to keep small.
APPD_BENCH_BASELINE=/path/to/other/checkout profiles that appd instead.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import FLASK, HELLO  # noqa: E402
from load import run_wrk, wrk_path  # noqa: E402
from servers import BIN, AppdServer  # noqa: E402
from wsgi_servers import BaselineAppdServer, baseline_wanted  # noqa: E402

# Functions whose own time is (nearly all) one socket system call; py-spy sees
# Python frames only, so the kernel's time shows up as theirs.
SOCKET_CALLS = ("accept", "recv_into", "recv", "sendall", "_sendall", "sendfile", "_real_close", "fill",
                "close", "send", "_recv_into", "_send", "_accept")
RATE = 500  # py-spy samples per second

# Leaf frames of a thread that waits for work (py-spy counts some of them as busy):
# the poller's epoll_wait, a pool thread's queue get.
IDLE_LEAVES = ("select (selectors.py", "_worker (concurrent/futures/thread.py:81)", "wait (threading.py",
               "get (queue.py", "ThreadWorker.run_thread (appd/workers/gthread.py")
# appd frames that call the app: time below them (outside appd) is the app's.
APP_CALLERS = ("_serve", "send_result", "_run_app", "serve_request")


def _name(frame: str) -> str:
    return frame.split(" ")[0].rsplit(".", 1)[-1]


def _in_appd(frame: str) -> bool:
    return "(appd/" in frame or "/appd/" in frame


def classify(frames: list[str]) -> str:
    """"idle" (waiting for work), "socket" (a frame around one socket call), "appd"
    (appd's own code, with the C parser and the thread pool it uses) or "app"
    (below the app call)."""
    leaf = frames[-1]
    if leaf.startswith(IDLE_LEAVES) or ".select (selectors.py" in leaf:
        return "idle"
    if _name(leaf) in SOCKET_CALLS:
        return "socket"
    if _in_appd(leaf):
        return "appd"
    for frame in reversed(frames):
        if _in_appd(frame):
            return "app" if _name(frame) in APP_CALLERS else "appd"
    return "appd"  # the thread pool's own frames: appd's machinery too


def sample(pid: int, seconds: float, out: Path) -> None:
    subprocess.run([str(BIN / "py-spy"), "record", "--pid", str(pid), "--duration", str(int(seconds)),
                    "--rate", str(RATE), "--format", "raw", "--output", str(out)],
                   check=True, capture_output=True, timeout=seconds + 60)


def summarize(raw: Path, top: int, requests: float | None = None) -> None:
    """requests: how many the worker served while sampled, for µs per request."""
    own, inclusive, shares, total = Counter(), Counter(), Counter(), 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        total += int(count)
        own[frames[-1]] += int(count)
        shares[classify(frames)] += int(count)
        for frame in set(frames):
            inclusive[frame] += int(count)
    if not total:
        raise SystemExit("hotpath: py-spy took no samples")
    busy = total - shares["idle"]
    print(f"{total} samples, {100 * busy / total:.0f}% busy; shares of the busy time: "
          + ", ".join(f"{what} {100 * shares[what] / max(busy, 1):.0f}%" for what in ("appd", "socket", "app")))
    if requests:
        print(f"per request ({requests:.0f} requests sampled; wall time of the sampled stacks, so a busy "
              "machine inflates it): " + ", ".join(f"{what} {shares[what] / RATE / requests * 1e6:.1f} µs"
                                                    for what in ("appd", "socket", "app")))
    print("own time:")
    for frame, n in own.most_common(top):
        print(f"  {100 * n / total:5.1f}%  {frame}")
    print("inclusive, below the worker's serve loop:")
    deep = [(f, n) for f, n in inclusive.most_common() if n < 0.95 * total]
    for frame, n in deep[:top]:
        print(f"  {100 * n / total:5.1f}%  {frame}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--app", choices=("hello", "flask"), default="hello")
    parser.add_argument("--worker", choices=("sync", "gthread"), default="sync")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if not wrk_path() or not shutil.which("py-spy", path=str(BIN)):
        raise SystemExit("hotpath: needs wrk and py-spy (make bench installs both)")
    with tempfile.TemporaryDirectory(prefix="appd-profile-") as tmp:
        kind = BaselineAppdServer if baseline_wanted() else AppdServer
        options = {"threads": 4, "keepalive": 5} if args.worker == "gthread" else {}
        # py-spy sees Python frames only: in the compiled appd.http (appd/speedups.py)
        # appd's own code, its socket calls and the app call would all hide in the
        # worker loop's frame. So the shares are the pure-Python modules'.
        options["env"] = {"APPD_PURE_PYTHON": "1"}
        with kind(HELLO if args.app == "hello" else FLASK, 1, Path(tmp), **options) as server:
            worker = server.worker_pids()[0]
            result = {}
            load = threading.Thread(target=lambda: result.update(run_wrk(
                server.url, threads=1, connections=8, duration=args.seconds + 3)))
            load.start()
            try:
                sample(worker, args.seconds, Path(tmp) / "profile.raw")
            finally:
                load.join()
            sampled = result["rps"] * args.seconds if result.get("rps") else None
            summarize(Path(tmp) / "profile.raw", args.top, sampled)


if __name__ == "__main__":
    main()
