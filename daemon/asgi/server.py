"""What every connection of one asgi worker shares: the app, the limits and
deadlines from the config, the access log, and the live counters the worker
reports to its master (busy requests, the age of the oldest one)."""

from __future__ import annotations

import time

from ..http.request import MAX_HEAD_BYTES

ASGI_INFO = {"version": "3.0", "spec_version": "2.3"}
# Request body bytes held for an app that does not read them yet; above this
# the connection stops reading, so a fast uploader cannot fill the worker's memory.
BODY_HIGH_WATER = 256 * 1024
# Unread request body left when the response is done: up to this much is read
# and thrown away to keep the connection; more closes it.
DRAIN_LIMIT = 64 * 1024
# Pipelined request heads parsed ahead of the one being answered before reading pauses.
PIPELINE_DEPTH = 8


class ServerState:
    def __init__(self, loop, app, cfg: dict, access_log, lifespan_state: dict | None,
                 count_request) -> None:
        self.loop = loop
        self.app = app
        self.keepalive = cfg.keepalive
        self.header_timeout = cfg.header_timeout
        self.ws_drain_timeout = cfg.websocket_drain_timeout or 0.0
        self.limit_line = cfg.limit_request_line
        self.limit_fields = cfg.limit_request_fields
        self.limit_field_size = cfg.limit_request_field_size
        if self.limit_line and self.limit_fields and self.limit_field_size:
            self.max_head = self.limit_line + 4 + self.limit_fields * (self.limit_field_size + 2) + 2
        else:
            self.max_head = MAX_HEAD_BYTES
        self.access_log = access_log
        self.lifespan_state = lifespan_state  # None: the app has no lifespan, no scope["state"]
        self.count_request = count_request
        self.connections: set = set()  # HTTP and WebSocket protocols alike
        self.active: set = set()       # request cycles the app is running
        self.stopping = False
        self.on_connection_lost = None  # set by the worker: re-open accepting below the limit
        self.handing_off = False        # stopping or paused, and idle connections go to the serving workers
        self.on_idle = None             # set by the worker: a connection of a stopping (or paused) worker went idle

    def scope_state(self) -> dict | None:
        state = self.lifespan_state
        return None if state is None else state.copy()

    def busy(self) -> tuple[int, float]:
        """(requests in progress, age in seconds of the oldest one)."""
        if not self.active:
            return 0, 0.0
        oldest = min(cycle.started for cycle in self.active)
        return len(self.active), time.monotonic() - oldest

    def expire(self, now: float) -> None:
        """Called a few times a second: connections past their head or idle deadline."""
        for conn in list(self.connections):
            deadline = conn.deadline
            if deadline and now >= deadline:
                conn.on_deadline()

    def remove(self, conn) -> None:
        self.connections.discard(conn)
        if self.on_connection_lost is not None:
            self.on_connection_lost()
