"""StatsD (statsd_host, statsd_prefix): the same figures as /metrics, sent by
the daemon every two seconds over UDP, non-blocking (a lost datagram is a
lost sample, never a stalled daemon). Counters go as the increase since the
last send (|c), everything else as gauges (|g)."""

from __future__ import annotations

import re
import socket

from .health_server import parse_bind

INTERVAL = 2.0
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


class StatsdSink:
    def __init__(self, daemon, spec: str, prefix: str):
        self.daemon = daemon
        self.address = parse_bind(spec)
        self.prefix = prefix.rstrip(".")
        family = socket.AF_INET6 if ":" in self.address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sent_totals: dict[str, float] = {}
        daemon.loop.call_later(INTERVAL, self.tick)

    def tick(self) -> None:
        if self.sock.fileno() < 0:
            return
        self.daemon.loop.call_later(INTERVAL, self.tick)
        self.send(self.lines())

    def lines(self) -> list[str]:
        from .metrics import Collector
        lines = []
        for family in Collector(self.daemon).collect():
            for sample in family.samples:
                if sample.name.endswith(("_bucket", "_created")):
                    continue  # histograms go as their count and sum
                name = ".".join([self.prefix, sample.name.removeprefix("appd_")] + [_UNSAFE.sub("_", str(v))
                                                              for _, v in sorted(sample.labels.items())])
                if family.type in ("counter", "histogram"):
                    delta = sample.value - self.sent_totals.get(name, 0.0)
                    self.sent_totals[name] = sample.value
                    if delta > 0:
                        lines.append(f"{name}:{delta:g}|c")
                else:
                    lines.append(f"{name}:{sample.value:g}|g")
        return lines

    def send(self, lines: list[str]) -> None:
        packet: list[str] = []
        for line in lines + [None]:
            if packet and (line is None or sum(len(p) + 1 for p in packet) + len(line) > 1400):
                try:
                    self.sock.sendto("\n".join(packet).encode(), self.address)
                except OSError:
                    pass  # nobody listening, or the buffer is full: drop this sample
                packet = []
            if line is not None:
                packet.append(line)

    def close(self) -> None:
        self.sock.close()
