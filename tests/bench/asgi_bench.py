"""Scenario 8, ASGI: appd's asgi worker beside uvicorn (--workers 2, httptools,
uvloop), granian (ASGI, 2 workers) and gunicorn with UvicornWorker.

  8a  hello ASGI and a FastAPI JSON endpoint, 2 workers, 32 keep-alive
      connections (wrk): requests/s and p99
  8b  upgrades under keep-alive GET/POST load: appd `upgrade` against
      uvicorn's and granian's SIGHUP restart: failed requests (target 0)
  8c  WebSocket clients sending every 100 ms through upgrades / SIGHUPs:
      messages lost without a close frame (target 0), close codes, reconnect time

In the table the "gunicorn" column holds the server named in the figure."""

from __future__ import annotations

import time

import asgi_servers
from asgi_load import KeepAliveLoad, WebSocketLoad
from common import Context, Row, median
from scenarios import under_load
from throughput import _measure_throughput

HELLO_ASGI, FASTAPI = "bench_asgi:app", "bench_fastapi:app"
OTHERS = ("uvicorn", "granian", "gunicorn+uvicorn")
RESTARTERS = ("uvicorn", "granian")  # servers with a SIGHUP worker restart to set beside upgrade


def run(ctx: Context):
    rows, raw = [], {}
    for function in (asgi_throughput, upgrades_under_keepalive_load, websockets_through_upgrades):
        r, raw[function.__name__] = function(ctx)
        rows += r
    return rows, raw


# --- 8a ---------------------------------------------------------------------------

def asgi_throughput(ctx: Context):
    if not ctx.use_wrk:
        ctx.log("  asgi throughput: skipped, the keep-alive load needs wrk")
        return [Row("ASGI throughput", "requests/s", None, None, "rps", note="skipped: needs wrk")], {}
    rows, raw = [], {}
    for label, app in (("hello ASGI", HELLO_ASGI), ("FastAPI JSON", FASTAPI)):
        runs = {kind: [] for kind in ("appd", *OTHERS)}
        servers = [asgi_servers.make(kind, app, 2, ctx) for kind in runs]
        for server in servers:
            server.start()
        try:
            for server in servers:  # warm-up, not counted
                _measure_throughput(ctx, server, 2.0)
            for i in range(ctx.runs):
                for server in (servers if i % 2 == 0 else servers[::-1]):
                    result = _measure_throughput(ctx, server, ctx.wrk_seconds)
                    runs[server.kind].append(result)
                    ctx.log(f"  {label} {server.kind}: {result['rps']:.0f} req/s, "
                            f"p99 {result['p99_s'] * 1000:.1f} ms, errors {result['errors']}")
        finally:
            for server in servers:
                server.stop()
        rps = {k: median(r["rps"] for r in v) for k, v in runs.items()}
        p99 = {k: median(r["p99_s"] for r in v) for k, v in runs.items()}
        scenario = f"{label}, 2 workers, 32 keep-alive connections"
        for other in OTHERS:
            target = "≥ 1.0×" if other == "uvicorn" else ""
            rows.append(Row(scenario, f"requests/s vs {other}", rps["appd"], rps[other], "rps", target,
                            rps["appd"] >= rps[other] if target else None))
            rows.append(Row(scenario, f"p99 latency vs {other}", p99["appd"], p99[other], "s"))
        errors = sum(r["errors"] for r in runs["appd"])
        rows.append(Row(scenario, "appd errors (all runs)", errors, None, "count", "0", errors == 0))
        raw[label] = runs
    return rows, raw


# --- 8b ---------------------------------------------------------------------------

def upgrades_under_keepalive_load(ctx: Context):
    n = ctx.operations
    raw = {}
    with asgi_servers.make("appd", HELLO_ASGI, 2, ctx) as appd:
        raw["appd"] = under_load(ctx, appd, lambda: appd.operation("upgrade"), n,
                                 f"appd asgi upgrade ×{n}, keep-alive", make_load=_keepalive_load)
    for kind in RESTARTERS:
        with asgi_servers.make(kind, HELLO_ASGI, 2, ctx) as server:
            raw[kind] = under_load(ctx, server, server.hup, n, f"{kind} SIGHUP ×{n}, keep-alive",
                                   make_load=_keepalive_load)
    rows = []
    a = raw["appd"]
    for kind in RESTARTERS:
        o = raw[kind]
        scenario = f"ASGI keep-alive GET/POST: appd upgrade vs {kind} SIGHUP ×{n}"
        rows += [Row(scenario, "failed requests", a["failed"], o["failed"], "count", "0", a["failed"] == 0,
                     note=f"of {a['requests']} / {o['requests']}"),
                 Row(scenario, "p99 latency during ops", a["during_ops"]["p99_s"], o["during_ops"]["p99_s"], "s"),
                 Row(scenario, "seconds per operation", a["median_seconds_per_op"], o["median_seconds_per_op"],
                     "s")]
    return rows, raw


def _keepalive_load(address: str):
    return KeepAliveLoad(address, connections=32, processes=4, timeout=30.0, max_seconds=600.0)


# --- 8c ---------------------------------------------------------------------------

def websockets_through_upgrades(ctx: Context):
    clients = 50 if ctx.quick else 200
    n = 3 if ctx.quick else 10
    raw = {}
    with asgi_servers.make("appd", HELLO_ASGI, 2, ctx) as appd:
        raw["appd"] = _ws_run(ctx, appd, lambda: appd.operation("upgrade"), clients, n, "appd upgrade")
    for kind in RESTARTERS:
        with asgi_servers.make(kind, HELLO_ASGI, 2, ctx) as server:
            raw[kind] = _ws_run(ctx, server, server.hup, clients, n, f"{kind} SIGHUP")
    rows = []
    a = raw["appd"]
    for kind in RESTARTERS:
        o = raw[kind]
        scenario = f"{clients} WebSockets, a message per 100 ms: appd upgrade vs {kind} SIGHUP ×{n}"
        rows += [
            Row(scenario, "messages lost without a close frame", a["lost_without_close_frame"],
                o["lost_without_close_frame"], "count", "0", a["lost_without_close_frame"] == 0,
                note=f"of {a['sent']} / {o['sent']} sent"),
            Row(scenario, "close codes seen", None, None, "count",
                note=f"appd {a['close_codes']}, {kind} {o['close_codes']}"),
            Row(scenario, "p99 time to reconnect", a["reconnect_p99_s"], o["reconnect_p99_s"], "s"),
        ]
    return rows, raw


def _ws_run(ctx: Context, server, operation, clients: int, count: int, label: str) -> dict:
    url = f"ws://{server.address}/ws"
    with WebSocketLoad(url, clients=clients, processes=2, max_seconds=600.0) as load:
        time.sleep(2.0)  # every client connected and sending
        seconds = [operation() for _ in range(count)]
        time.sleep(2.0)  # reconnected after the last one
        stats = load.stop()
    delays = sorted(stats["reconnect_s"])
    stats["reconnect_p50_s"] = delays[len(delays) // 2] if delays else None
    stats["reconnect_p99_s"] = delays[min(len(delays) - 1, int(len(delays) * 0.99))] if delays else None
    stats["reconnect_s"] = len(delays)
    stats["median_seconds_per_op"] = median(seconds)
    ctx.log(f"  {label} ×{count}, {clients} WebSockets: sent {stats['sent']}, lost without close frame "
            f"{stats['lost_without_close_frame']}, with close frame {stats['lost_with_close_frame']}, "
            f"close codes {stats['close_codes']}, reconnect p99 {stats['reconnect_p99_s']}, "
            f"connect errors {stats['connect_errors']}")
    return stats
