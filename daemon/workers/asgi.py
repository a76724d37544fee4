"""The asgi worker: one asyncio loop (uvloop when installed) serving an ASGI 3
app, accepting directly on the shared listeners while it holds fewer than
`worker_connections` connections.

The loop itself sends the heartbeats, so a handler that blocks it (a
`time.sleep(60)`) goes silent and the master's `timeout` finds it hung
(SIGABRT: its traceback is logged). Signal handlers only record and wake
the loop; stopping happens in the loop:

  graceful (TERM, HUP)  stop accepting; requests in hand and pipelined ones
                        already read are answered (the last with Connection:
                        close); idle keep-alive connections stay until their
                        keep-alive deadline (see release_idle); WebSockets get
                        websocket.disconnect and close code 1012; then the
                        lifespan shutdown. All within graceful_timeout.
  drain (USR2)          the same, after accepting what waits in the backlog
  quick (INT, QUIT)     exit now
"""

from __future__ import annotations

import asyncio
import errno
import time

from .. import app as app_loading
from ..access import RequestLog
from ..asgi import loading
from ..asgi.http import HttpProtocol
from ..asgi.lifespan import Lifespan, LifespanFailed
from ..asgi.server import ServerState
from .base import Worker

_ACCEPT_ERRORS = (errno.EAGAIN, errno.ECONNABORTED, errno.EPROTO, errno.EINTR)
TICK_S = 0.25          # deadlines and liveness are checked this often
ACCEPT_BATCH = 1       # connections taken per wake-up: the other workers, woken too, get their share


def new_event_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def listener_address(listener) -> tuple | None:
    """scope["server"]: (host, port), or None for a unix socket."""
    address = listener.address
    if address.startswith("unix:"):
        return None
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


class AsgiWorker(Worker):
    loop: asyncio.AbstractEventLoop | None = None
    server: ServerState | None = None

    # --- booting: app, lifespan startup, ready check ---

    def boot(self) -> int:
        try:
            self.loop = new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.app = loading.load(self.cfg["app"], self.cfg.get("factory", False), self.app)
            self.lifespan = Lifespan(self.app, self.loop)
            self.loop.run_until_complete(self.lifespan.startup())
            path = self.cfg["ready_check"]
            if path:
                state = self.lifespan.state if self.lifespan.supported else None
                ok, status = self.loop.run_until_complete(loading.ready_check(self.app, path, state))
                if not ok:
                    raise app_loading.AppLoadError(f"ready_check GET {path} answered {status!r}")
        except SystemExit:
            raise
        except LifespanFailed as exc:
            return self.fail_boot(f"ASGI lifespan startup failed: {exc}\n")
        except BaseException:
            import traceback
            return self.fail_boot(traceback.format_exc())
        return 0

    def wait_for_cutover(self) -> bool:
        if super().wait_for_cutover():
            return True
        self.loop.run_until_complete(self.lifespan.shutdown(self.cfg["graceful_timeout"]))
        return False

    # --- serving ---

    def serve(self) -> None:
        self.loop.add_reader(self.wake_r.fileno(), self._drain_wakeups)
        self.loop.run_until_complete(self.main())

    async def main(self) -> None:
        cfg = self.cfg
        self.stop_requested = asyncio.Event()
        access_log = RequestLog(self)
        state = self.lifespan.state if self.lifespan.supported else None
        self.server = ServerState(self.loop, self.app, cfg, access_log, state, self.count_request)
        self.server.on_connection_lost = self._below_limit
        self.max_connections = cfg["worker_connections"]
        self.listening = [(l.sock, listener_address(l)) for l in self.listeners]
        self.accepting = False
        self.set_accepting(True)
        ticker = self.loop.create_task(self.tick())
        if self.alive:
            await self.stop_requested.wait()
        await self.stop_serving()
        ticker.cancel()

    async def tick(self) -> None:
        """Heartbeats, deadlines, and noticing a stop (signal, max_requests, master gone)."""
        while True:
            now = time.monotonic()
            self.heartbeat(now)
            self.server.expire(self.loop.time())
            if not self.master_alive():
                self.log.warning("master_gone", detail="stopping")
                self.alive = False
            if not self.alive:
                self.stop_requested.set()
            await asyncio.sleep(TICK_S)

    def count_request(self) -> None:
        super().count_request()
        if not self.alive:  # max_requests: stop accepting now, not at the next tick
            self.stop_requested.set()

    def load_now(self) -> tuple:
        if self.server is None:
            return 0, 0.0
        return self.server.busy()

    # --- accepting ---

    def set_accepting(self, accepting: bool) -> None:
        """Listen only below worker_connections, so a full worker leaves connections to others."""
        if accepting == self.accepting:
            return
        self.accepting = accepting
        for sock, address in self.listening:
            if accepting:
                self.loop.add_reader(sock.fileno(), self.accept, sock, address)
            else:
                self.loop.remove_reader(sock.fileno())

    def accept(self, sock, address) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.server.connections) >= self.max_connections:
                self.set_accepting(False)
                return
            try:
                conn, peer = sock.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRORS:
                    self.log.warning("accept_failed", error=str(exc))
                return
            self.connect(conn, peer, address)

    def connect(self, conn, peer, address) -> None:
        conn.setblocking(False)
        client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        protocol = HttpProtocol(self.server, address, client)
        self.server.connections.add(protocol)  # counts toward the limit from now on
        self.loop.create_task(self._attach(conn, protocol))

    async def _attach(self, conn, protocol) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            self.server.remove(protocol)
            conn.close()

    def _below_limit(self) -> None:
        if self.alive and not self.accepting and len(self.server.connections) < self.max_connections:
            self.set_accepting(True)

    # --- stopping ---

    async def stop_serving(self) -> None:
        server = self.server
        deadline = time.monotonic() + self.cfg["graceful_timeout"]
        if self.sweep:
            for sock, address in self.listening:
                self.accept_backlog(sock, address)
        self.set_accepting(False)
        server.stopping = True
        for conn in list(server.connections):
            if hasattr(conn, "on_stop"):
                conn.on_stop()
        self.release_idle([conn for conn in server.connections if conn.is_idle()])
        # Keep time for the lifespan shutdown inside graceful_timeout.
        reserve = min(5.0, self.cfg["graceful_timeout"] / 4)
        while server.connections and time.monotonic() < deadline - reserve:
            await asyncio.sleep(0.05)
        for conn in list(server.connections):
            conn.transport.close()
        await self.lifespan.shutdown(deadline - time.monotonic())

    def accept_backlog(self, sock, address) -> None:
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                return
            self.connect(conn, peer, address)

    def release_idle(self, idle: list) -> None:
        """Idle kept-alive connections at a stop. The seam for connection handoff
        (APPD_HANDOFF_FD): a worker that can pass them to the next generation does
        it here. Without it they stay open until their keep-alive deadline, and a
        request one sends meanwhile is served with `Connection: close`: closing an
        idle connection under a client would race its next request."""

    # --- signals: record, then wake the loop ---

    def _graceful(self, signum, frame) -> None:
        super()._graceful(signum, frame)
        self._wake_loop()

    def _wake_loop(self) -> None:
        loop = self.loop
        if loop is not None and not loop.is_closed() and self.server is not None:
            loop.call_soon_threadsafe(self.stop_requested.set)

    def _drain_wakeups(self) -> None:
        try:
            while self.wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass
