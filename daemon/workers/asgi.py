"""The asgi worker: one asyncio loop (uvloop when installed) serving an ASGI 3
app, accepting directly on the shared listeners while it holds fewer than
`worker_connections` connections.

The loop itself sends the heartbeats, so a handler that blocks it (a
`time.sleep(60)`) goes silent and the master's `timeout` finds it hung
(SIGABRT: its traceback is logged). Signal handlers only record and wake
the loop; stopping happens in the loop:

  graceful (TERM, HUP)  stop accepting; requests in hand and pipelined ones
                        already read are answered (the last with Connection:
                        close); idle keep-alive connections are handed to
                        the serving workers when the master says they take
                        them (HANDOFF=1), or else stay until their keep-alive
                        deadline (see release_idle); WebSockets get
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
from .. import handoff
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
    TAKES_HANDOFF = True  # the master may hand this worker's idle connections on when it stops
    handoff: handoff.Channel | None = None
    handed_on = 0
    loop: asyncio.AbstractEventLoop | None = None
    server: ServerState | None = None

    # --- booting: app, lifespan startup, ready check ---

    def boot(self) -> int:
        try:
            self.loop = new_event_loop()
            asyncio.set_event_loop(self.loop)
            self.app = loading.load(self.cfg.app, self.cfg.factory, self.app)
            self.lifespan = Lifespan(self.app, self.loop)
            self.loop.run_until_complete(self.lifespan.startup())
            path = self.cfg.ready_check
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
        self.loop.run_until_complete(self.lifespan.shutdown(self.cfg.graceful_timeout))
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
        self.server.on_idle = self.pass_on
        self.max_connections = cfg.worker_connections
        self.handoff = handoff.Channel.from_env()
        self.listening = [(l.sock, listener_address(l), l.name) for l in self.listeners]
        self.accepting = False
        self.set_accepting(not self.paused)
        self.loop.add_reader(self.reporter.sock.fileno(), self.check_orders)  # PAUSE / RESUME
        if self.paused:
            self.pause_changed(True)
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
        if not self.alive:  # max_requests: stop now, so the connection that got the last
            self.begin_stop()  # answer is handed on before it sends another request here
            self.stop_requested.set()

    def load_now(self) -> tuple:
        if self.server is None:
            return 0, 0.0
        return self.server.busy()

    # --- accepting ---

    def set_accepting(self, accepting: bool) -> None:
        """Listen (and take handed-on connections) only below worker_connections,
        so a full worker leaves connections to others."""
        if accepting == self.accepting:
            return
        self.accepting = accepting
        for sock, address, name in self.listening:
            if accepting:
                self.loop.add_reader(sock.fileno(), self.accept, sock, address, name)
            else:
                self.loop.remove_reader(sock.fileno())
        if self.handoff is not None:
            if accepting:
                self.loop.add_reader(self.handoff.fileno(), self.take_handed)
            else:
                self.loop.remove_reader(self.handoff.fileno())

    def accept(self, sock, address, name) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.full():
                return
            try:
                conn, peer = sock.accept()
            except OSError as exc:
                if exc.errno not in _ACCEPT_ERRORS:
                    self.log.warning("accept_failed", error=str(exc))
                return
            self.connect(conn, peer, address, name)

    def full(self) -> bool:
        if not self.paused and len(self.server.connections) < self.max_connections:
            return False
        self.set_accepting(False)
        return True

    def take_handed(self, everything: bool = False) -> None:
        """Connections another worker handed on: as if accepted here, with what it had
        read (on drain: every one waiting, like the backlog)."""
        if self.handoff is None or (not everything and self.full()):
            return
        for handed in self.handoff.receive(1_000_000 if everything else ACCEPT_BATCH):
            address, name = self.listener_named(handed.listener)
            if self.counts is not None:
                self.counts.handed_off(f"{address[0]}:{address[1]}" if address else name)
            self.connect(handed.sock, handed.peer, address, name, carried=handed.data)

    def listener_named(self, name: str) -> tuple:
        """(address, name) of the listener a handed-on connection was accepted on."""
        for _, address, listener in self.listening:
            if listener == name:
                return address, name
        _, address, listener = self.listening[0]
        return address, listener

    def connect(self, conn, peer, address, name, carried: bytes | None = None) -> None:
        conn.setblocking(False)
        client = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        protocol = HttpProtocol(self.server, address, client, name, carried)
        self.server.connections.add(protocol)  # counts toward the limit from now on
        self.loop.create_task(self._attach(conn, protocol))

    async def _attach(self, conn, protocol) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: protocol, conn)
        except OSError:
            self.server.remove(protocol)
            conn.close()

    def pause_changed(self, paused: bool) -> None:
        """Stand by: accept nothing (listeners nor handed-on connections), hand idle
        connections on (each one also as it turns idle after its response: on_idle),
        answer requests in progress and pipelined ones. Resume: accept again."""
        server = self.server
        if server is None or server.stopping or not self.alive:  # not serving yet (main() applies it),
            return                                                # or stopping: the stop decides handoff
        if paused:
            self.set_accepting(False)
            server.handing_off = self.handoff is not None and self.reporter.pause_hands_off
            self.release_idle(self.idle_connections())
        else:
            server.handing_off = False
            self.set_accepting(len(server.connections) < self.max_connections)

    def _below_limit(self) -> None:
        if self.alive and not self.paused and not self.accepting \
                and len(self.server.connections) < self.max_connections:
            self.set_accepting(True)

    # --- stopping ---

    async def stop_serving(self) -> None:
        server = self.server
        deadline = time.monotonic() + self.cfg.graceful_timeout
        if self.sweep:
            for sock, address, name in self.listening:
                self.accept_backlog(sock, address, name)
            self.take_handed(everything=True)
        self.begin_stop()
        for conn in list(server.connections):
            if hasattr(conn, "on_stop"):
                conn.on_stop()
        self.release_idle(self.idle_connections())
        # Keep time for the lifespan shutdown inside graceful_timeout.
        reserve = min(5.0, self.cfg.graceful_timeout / 4)
        while server.connections and time.monotonic() < deadline - reserve:
            await asyncio.sleep(0.05)
            if server.handing_off:  # e.g. one taken from the channel just before the stop, now attached
                self.release_idle(self.idle_connections())
        for conn in list(server.connections):
            conn.transport.close()
        self.log.info("worker_stopped", handed_on=self.handed_on, left_at_graceful_timeout=len(server.connections))
        await self.lifespan.shutdown(deadline - time.monotonic())

    def begin_stop(self) -> None:
        server = self.server
        if server.stopping:
            return
        self.set_accepting(False)
        # Decided before `stopping` is set, so no response in between says `Connection: close`.
        server.handing_off = self.handoff_wanted()
        server.stopping = True

    def accept_backlog(self, sock, address, name) -> None:
        """On drain: every connection queued (backlog and handoff channel) is served."""
        while True:
            try:
                conn, peer = sock.accept()
            except OSError:
                break
            self.connect(conn, peer, address, name)

    def idle_connections(self) -> list:
        return [conn for conn in self.server.connections if conn.is_idle() or getattr(conn, "in_head", False)]

    def release_idle(self, idle: list) -> None:
        """Idle kept-alive connections (or with part of their next request head) at a
        stop: handed to the serving workers (APPD_HANDOFF_FD) when the master said
        they take them. The others stay open until their keep-alive deadline, and a
        request one sends meanwhile is served with `Connection: close`: closing an
        idle connection under a client would race its next request."""
        for conn in idle:
            self.pass_on(conn)

    def pass_on(self, conn) -> bool:
        """Hand one connection on; False if it stays here (not handing off, it cannot
        move, or the channel is full: then later responses here say close)."""
        if not self.server.handing_off or not hasattr(conn, "handoff_data"):
            return False
        data = conn.handoff_data()
        sock = conn.transport.get_extra_info("socket") if data is not None else None
        if sock is None:
            return False
        conn.pause_reading()  # the transport reads no more: `data` is all it took
        if not self.handoff.send(sock, data, conn.name):
            self.server.handing_off = False
            conn.resume_reading()
            return False
        # Our descriptor only: the channel holds its own reference, so closing ours
        # (no shutdown(), which would end the connection for every holder) sends no FIN.
        conn.transport.abort()
        self.handed_on += 1
        return True

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
