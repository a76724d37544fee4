"""Load clients for the asgi bench, each in its own processes and bounded in time:

KeepAliveLoad   closed-loop HTTP/1.1 keep-alive connections, GET and POST in
                turn; a `Connection: close` answer makes the client reconnect,
                a request that gets no answer counts as failed (no retry, so a
                server that closes an idle connection under its client shows)
WebSocketLoad   N WebSocket clients sending a message every 100 ms; each close
                is recorded with its code (1006: no close frame), messages lost
                with and without a close frame, and the time to reconnect.
"""

from __future__ import annotations

import asyncio
import collections
import multiprocessing
import socket
import threading
import time
from array import array

from load import OK, LoadResult

_REFUSED, _RESET, _TIMEOUT, _INCOMPLETE, _BAD_STATUS, _OTHER = 1, 2, 3, 4, 5, 6


def _read_response(sock: socket.socket, buffer: bytearray) -> tuple[int, bool]:
    """(status, server keeps the connection); raises ConnectionError on EOF."""
    while b"\r\n\r\n" not in buffer:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed before a response")
        buffer += data
    head, _, rest = bytes(buffer).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0][9:12])
    fields = {k.strip().lower(): v.strip().lower() for k, _, v in (l.partition(":") for l in lines[1:])}
    length = int(fields.get("content-length", "0"))
    while len(rest) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("closed mid-body")
        rest += data
    buffer[:] = rest[length:]
    return status, fields.get("connection") != "close"


def _keepalive_thread(host, port, stop, hard_stop_at, timeout, out):
    starts, latencies, codes = out
    get = f"GET / HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    post = f"POST / HTTP/1.1\r\nHost: {host}\r\nContent-Length: 3000\r\n\r\n".encode() + b"x" * 3000
    sock, buffer, turn = None, bytearray(), 0
    while not stop.is_set() and time.monotonic() < hard_stop_at:
        turn += 1
        t0 = time.monotonic()
        code = OK
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=timeout)
                buffer.clear()
            sock.sendall(post if turn % 2 else get)
            status, keep = _read_response(sock, buffer)
            if status != 200:
                code = _BAD_STATUS
            if not keep:
                sock.close()
                sock = None
        except ConnectionRefusedError:
            code = _REFUSED
        except (TimeoutError, socket.timeout):
            code = _TIMEOUT
        except ConnectionError as exc:
            code = _RESET if isinstance(exc, ConnectionResetError) else _INCOMPLETE
        except OSError:
            code = _OTHER
        if code != OK and sock is not None:
            sock.close()
            sock = None
        starts.append(t0)
        latencies.append(time.monotonic() - t0)
        codes.append(code)
        if code == _REFUSED:
            time.sleep(0.001)
    if sock is not None:
        sock.close()


def _keepalive_process(host, port, threads, stop, hard_stop_at, timeout, pipe):
    outs = [(array("d"), array("d"), array("b")) for _ in range(threads)]
    workers = [threading.Thread(target=_keepalive_thread, args=(host, port, stop, hard_stop_at, timeout, o),
                                daemon=True) for o in outs]
    for w in workers:
        w.start()
    for w in workers:
        w.join(max(0.0, hard_stop_at - time.monotonic()) + timeout + 1)
    merged = [array("d"), array("d"), array("b")]
    for out in outs:
        for into, part in zip(merged, out):
            into.extend(part)
    pipe.send(tuple(a.tobytes() for a in merged))
    pipe.close()


class _Processes:
    def __init__(self, target, args_for, processes: int, timeout: float):
        self.ctx = multiprocessing.get_context("fork")
        self.stop_event = self.ctx.Event()
        self.target, self.args_for, self.processes, self.timeout = target, args_for, processes, timeout
        self.procs, self.pipes = [], []

    def start(self):
        for i in range(self.processes):
            parent, child = self.ctx.Pipe(duplex=False)
            proc = self.ctx.Process(target=self.target, args=(*self.args_for(i), self.stop_event, child),
                                    daemon=True)
            proc.start()
            child.close()
            self.procs.append(proc)
            self.pipes.append(parent)

    def collect(self) -> list:
        self.stop_event.set()
        deadline = time.monotonic() + self.timeout + 10
        results = []
        for proc, pipe in zip(self.procs, self.pipes):
            if pipe.poll(max(0.1, deadline - time.monotonic())):
                results.append(pipe.recv())
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        return results


def _keepalive_entry(host, port, threads, hard_stop_at, timeout, stop, pipe):
    _keepalive_process(host, port, threads, stop, hard_stop_at, timeout, pipe)


class KeepAliveLoad:
    def __init__(self, address: str, connections: int = 32, processes: int = 4, timeout: float = 30.0,
                 max_seconds: float = 900.0):
        host, _, port = address.rpartition(":")
        hard_stop_at = time.monotonic() + max_seconds
        per = [connections // processes + (1 if i < connections % processes else 0) for i in range(processes)]
        self.group = _Processes(_keepalive_entry, lambda i: (host, int(port), per[i], hard_stop_at, timeout),
                                processes, timeout)
        self.result = LoadResult()

    def __enter__(self) -> "KeepAliveLoad":
        self.result.began = time.monotonic()
        self.group.start()
        return self

    def stop(self) -> LoadResult:
        self.result.ended = time.monotonic()
        for starts, latencies, codes in self.group.collect():
            self.result.starts.frombytes(starts)
            self.result.latencies.frombytes(latencies)
            self.result.codes.frombytes(codes)
        return self.result

    def __exit__(self, *exc):
        if not self.group.stop_event.is_set():
            self.stop()


# --- WebSockets -------------------------------------------------------------------

async def _ws_client(url: str, stop_at: float, stop, stats: dict) -> None:
    """One client: connect, message until the server closes, count, reconnect."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed
    closed_at = None
    while time.monotonic() < stop_at and not stop.is_set():
        try:
            async with connect(url, open_timeout=30, max_queue=None, ping_interval=None) as ws:
                await ws.recv()  # hello
                if closed_at is not None:
                    stats["reconnect_s"].append(time.monotonic() - closed_at)
                pending: set = set()
                if await _exchange(ws, pending, stop_at, stop, stats):
                    return  # the run is over: we closed
                rcvd = ws.protocol.close_rcvd
                stats["close_codes"][rcvd.code if rcvd is not None else 1006] += 1
                key = "lost_with_close_frame" if rcvd is not None else "lost_without_close_frame"
                stats[key] += len(pending)
                closed_at = time.monotonic()
        except (OSError, asyncio.TimeoutError, ConnectionClosed) as exc:
            stats["connect_errors"][type(exc).__name__] += 1
            closed_at = closed_at or time.monotonic()
            await asyncio.sleep(0.05)


async def _exchange(ws, pending: set, stop_at: float, stop, stats: dict) -> bool:
    """Send a message every 100 ms while echoes come back; `pending` keeps those not
    echoed. True if we closed (end of run), False if the server did."""
    from websockets.exceptions import ConnectionClosed

    async def reader():
        async for text in ws:
            pending.discard(text)
            stats["echoed"] += 1
    reading = asyncio.ensure_future(reader())
    try:
        while time.monotonic() < stop_at and not stop.is_set() and not reading.done():
            stats["sent"] += 1
            text = f"{id(pending)}:{stats['sent']}"
            pending.add(text)
            await ws.send(text)
            await asyncio.sleep(0.1)
        if not reading.done():
            await ws.close()
            stats["closed_by_client"] += 1
            return True
        await reading
    except ConnectionClosed:
        pass
    finally:
        reading.cancel()
    return False


def _ws_process(url, clients, stop_at, stop, pipe):
    stats = {"sent": 0, "echoed": 0, "lost_with_close_frame": 0, "lost_without_close_frame": 0,
             "closed_by_client": 0, "close_codes": collections.Counter(),
             "connect_errors": collections.Counter(), "reconnect_s": []}

    async def main():
        await asyncio.gather(*(_ws_client(url, stop_at, stop, stats) for _ in range(clients)))
    asyncio.run(main())
    stats["close_codes"] = dict(stats["close_codes"])
    stats["connect_errors"] = dict(stats["connect_errors"])
    pipe.send(stats)
    pipe.close()


class WebSocketLoad:
    def __init__(self, url: str, clients: int = 200, processes: int = 2, max_seconds: float = 900.0):
        stop_at = time.monotonic() + max_seconds
        per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
        self.group = _Processes(_ws_process, lambda i: (url, per[i], stop_at), processes, 30.0)

    def __enter__(self) -> "WebSocketLoad":
        self.group.start()
        return self

    def stop(self) -> dict:
        total = {"sent": 0, "echoed": 0, "lost_with_close_frame": 0, "lost_without_close_frame": 0,
                 "closed_by_client": 0, "close_codes": collections.Counter(),
                 "connect_errors": collections.Counter(), "reconnect_s": []}
        for stats in self.group.collect():
            for key, value in stats.items():
                if isinstance(total[key], collections.Counter):
                    total[key].update(value)
                else:
                    total[key] += value
        total["close_codes"] = dict(total["close_codes"])
        total["connect_errors"] = dict(total["connect_errors"])
        return total

    def __exit__(self, *exc):
        if not self.group.stop_event.is_set():
            self.stop()
