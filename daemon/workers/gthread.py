"""The gthread worker: `threads` threads serve requests; the main thread
accepts and keeps idle keep-alive connections in its poller, so an idle
client holds no thread. New connections and idle ones that send a request
wait in one first-come, first-served line for a free thread; the worker
keeps accepting while it holds fewer than `worker_connections`. Pipelined
requests are served in order by the thread that has the connection. A
graceful stop closes idle connections at once and lets busy ones finish."""

from __future__ import annotations

import collections
import errno
import queue
import selectors
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from ..access import RequestLog
from ..http import Connection
from .base import Worker
from .sync import server_info

_ACCEPT_ERRORS = (errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR)


class ThreadWorker(Worker):
    def serve(self) -> None:
        cfg = self.cfg
        self.threads = cfg["threads"]
        self.keepalive = cfg["keepalive"]
        self.pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="appd-worker")
        self.access_log = RequestLog(self)
        self.returned: queue.SimpleQueue = queue.SimpleQueue()  # (connection, keep) from threads
        self.busy = 0                                         # connections handed to threads
        self.waiting: collections.deque = collections.deque()  # with a request, waiting for a thread
        self.parked: dict = {}                                # socket -> (connection, idle deadline)
        self.max_connections = cfg["worker_connections"]
        self.count_lock = threading.Lock()
        self.selector = selectors.DefaultSelector()
        self.selector.register(self.wake_r, selectors.EVENT_READ, None)
        self.listening = [(l.sock, server_info(l, cfg, multithread=True)) for l in self.listeners]
        self.accepting = False
        self.set_accepting(True)
        try:
            while self.alive:
                if not self.master_alive():
                    self.log.warning("master_gone", detail="stopping")
                    break
                self.heartbeat()
                for key, _ in self.wait_readable(self.selector, self.until_next_heartbeat()):
                    if key.data is None:
                        continue
                    kind, value = key.data
                    if kind == "listener":
                        self.accept(key.fileobj, value)
                    else:
                        self.unpark(key.fileobj)
                self.take_returned()
                self.dispatch()
                self.expire_idle()
                self.set_accepting(self.connections() < self.max_connections)
            self.stop_serving()
        finally:
            self.selector.close()

    # --- connections between the poller and the threads ---

    def connections(self) -> int:
        return self.busy + len(self.waiting) + len(self.parked)

    def accept(self, sock, info) -> None:
        while self.connections() < self.max_connections:
            try:
                conn, addr = sock.accept()
            except OSError as exc:
                if exc.errno in _ACCEPT_ERRORS:
                    return
                raise
            conn.setblocking(True)
            self.waiting.append(Connection(conn, addr, info))

    def dispatch(self, everything: bool = False) -> None:
        """Hand waiting connections to free threads (or queue them all), oldest first."""
        while self.waiting and (everything or self.busy < self.threads):
            self.busy += 1
            self.pool.submit(self.run_connection, self.waiting.popleft())

    def run_connection(self, connection: Connection) -> None:
        keep = False
        try:
            keep = connection.serve(self.app, self.access_log, self.keepalive, self.should_continue,
                                    self.count_request_locked, park=True)
        except Exception:
            self.log.exception("connection_failed")
            connection.close()
        finally:
            self.returned.put((connection, keep))
            self.wake_w.send(b"\0")

    def take_returned(self) -> None:
        while True:
            try:
                connection, keep = self.returned.get_nowait()
            except queue.Empty:
                return
            self.busy -= 1
            if keep and self.alive:
                self.parked[connection.sock] = (connection, time.monotonic() + self.keepalive)
                self.selector.register(connection.sock, selectors.EVENT_READ, ("parked", None))
            elif keep:
                connection.close()

    def unpark(self, sock) -> None:
        connection, _ = self.parked.pop(sock)
        self.selector.unregister(sock)
        self.waiting.append(connection)

    def expire_idle(self) -> None:
        now = time.monotonic()
        for sock, (connection, deadline) in list(self.parked.items()):
            if now >= deadline:
                del self.parked[sock]
                self.selector.unregister(sock)
                connection.close()

    def set_accepting(self, accepting: bool) -> None:
        """Listen only below worker_connections, so a full worker leaves connections to others."""
        if accepting == self.accepting:
            return
        self.accepting = accepting
        for sock, info in self.listening:
            if accepting:
                self.selector.register(sock, selectors.EVENT_READ, ("listener", info))
            else:
                self.selector.unregister(sock)

    # --- stopping ---

    def should_continue(self) -> bool:
        return self.alive

    def count_request_locked(self) -> None:
        with self.count_lock:
            self.count_request()

    def stop_serving(self) -> None:
        """Close idle connections at once; busy ones finish their request (bounded)."""
        for sock, (connection, _) in list(self.parked.items()):
            connection.close()
        self.parked.clear()
        if self.sweep:
            deadline = time.monotonic() + self.cfg["graceful_timeout"]
            for sock, info in self.listening:
                while time.monotonic() < deadline:
                    try:
                        conn, addr = sock.accept()
                    except OSError:
                        break
                    conn.setblocking(True)
                    self.waiting.append(Connection(conn, addr, info))
        self.dispatch(everything=True)  # they sent a request: answer it (with Connection: close)
        self.pool.shutdown(wait=True)
        while not self.returned.empty():
            connection, keep = self.returned.get_nowait()
            if keep:
                connection.close()
