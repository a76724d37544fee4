"""Abuse a control socket from a separate process (so the prober in the test
process keeps its own interpreter lock), then print what was done as JSON.

    python -m chaos.abuse --socket PATH --seed 7 --frames 10000 --drops 1000

`--drops` connections are opened and dropped (plain close, reset, after a
partial frame, right after a request); `--frames` seeded random frames
(FrameFuzzer) are sent over `--connections` parallel connections, one at a
time: each gets the replies it is owed (with its request id) or, for bad
framing, a hang-up, and the next frame goes on a new connection. Anything else
is counted under a key starting with UNEXPECTED.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import socket
import struct
import sys
import threading
import time
import traceback

from appdctl import protocol

from chaos.tools import FrameFuzzer


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n


def connect(path: str, stats: Stats) -> socket.socket | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    try:
        sock.connect(path)
    except OSError as exc:
        stats.add(f"connect_failed:{type(exc).__name__}")
        sock.close()
        return None
    stats.add("connections")
    return sock


def drop_connections(path: str, count: int, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    request = protocol.encode({"v": 1, "id": 1, "cmd": "status", "args": {}})
    for _ in range(count):
        sock = connect(path, stats)
        if sock is None:
            time.sleep(0.01)
            continue
        how = rng.choice(["close", "close", "reset", "partial", "request"])
        try:
            if how == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif how == "partial":
                sock.send(request[:rng.randint(1, len(request) - 1)])
            elif how == "request":
                sock.send(request)  # and leave without reading the reply
        except OSError:
            stats.add("drop_send_failed")
        sock.close()
        stats.add(f"dropped:{how}")
        time.sleep(0.001)  # a steady stream rather than one burst past the client limit


def fuzz(path: str, frames: int, seed: int, stats: Stats) -> None:
    """Send frames one at a time and check the daemon's answer to each: the
    replies it owes (with the request's id), or a hang-up for bad framing."""
    fuzzer = FrameFuzzer(seed)
    sock, decoder = None, protocol.FrameDecoder()

    def hang_up():
        nonlocal sock, decoder
        if sock is not None:
            sock.close()
        sock, decoder = None, protocol.FrameDecoder()
        leftovers.clear()

    def next_reply():
        """The next reply, or None when the daemon hung up. Raises socket.timeout."""
        pending = []
        while not pending:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                data = b""
            if not data:
                return None
            pending = decoder.feed(data)
            if len(pending) > 1:
                leftovers.extend(pending[1:])
        return pending[0]

    leftovers: list = []
    sent = 0
    while sent < frames:
        if sock is None:
            sock = connect(path, stats)
            if sock is None:
                time.sleep(0.01)
                continue
        frame = fuzzer.frame()
        sent += 1
        stats.add(f"frame:{frame.kind}")
        try:
            sock.settimeout(5)
            sock.sendall(frame.data)
        except OSError:
            stats.add("send_failed")
            hang_up()
            continue
        if frame.expect == "hang_up":
            hang_up()
            continue
        try:
            if frame.expect == "reply":
                for expected_id in frame.ids:
                    reply = leftovers.pop(0) if leftovers else next_reply()
                    if reply is None:
                        stats.add(f"UNEXPECTED_close_after:{frame.kind}")
                        hang_up()
                        break
                    code = "ok" if reply.get("ok") else (reply.get("error") or {}).get("code", "?")
                    stats.add(f"reply:{code}")
                    if expected_id is not None and reply.get("id") != expected_id:
                        stats.add("UNEXPECTED_reply_id")
            else:
                reply = next_reply()
                if _is_parting_error(reply):  # the reason, then the close
                    stats.add("parting_error")
                    reply = next_reply()
                    if reply is not None:
                        stats.add(f"UNEXPECTED_reply_after_parting_error:{frame.kind}")
                if reply is None:
                    stats.add("closed_by_daemon")
                    hang_up()
                elif frame.expect == "close_or_reply":
                    stats.add(f"reply:{(reply.get('error') or {}).get('code', 'ok')}")
                else:
                    stats.add(f"UNEXPECTED_reply_to:{frame.kind}")
        except socket.timeout:
            stats.add(f"UNEXPECTED_no_answer_to:{frame.kind}")
            hang_up()
    hang_up()


def _is_parting_error(reply) -> bool:
    """The daemon's last word on garbage framing: a bad_request without an id."""
    return (isinstance(reply, dict) and reply.get("id") is None and reply.get("ok") is False
            and (reply.get("error") or {}).get("code") == protocol.BAD_REQUEST
            and "closing the connection" in (reply.get("error") or {}).get("message", ""))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--socket", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--frames", type=int, default=10000)
    parser.add_argument("--drops", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    args = parser.parse_args(argv)
    stats = Stats()
    started = time.monotonic()
    errors: list[str] = []

    def guarded(target, *a):
        try:
            target(*a)
        except BaseException:
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=guarded, args=(drop_connections, args.socket, args.drops, args.seed, stats))]
    per = [args.frames // args.connections + (i < args.frames % args.connections)
           for i in range(args.connections)]
    threads += [threading.Thread(target=guarded, args=(fuzz, args.socket, n, args.seed * 1000 + i, stats))
                for i, n in enumerate(per)]
    print("started", flush=True)
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result = dict(sorted(stats.counts.items()))
    result["seconds"] = round(time.monotonic() - started, 2)
    json.dump(result, sys.stdout)
    print()
    sys.stderr.write("".join(errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
