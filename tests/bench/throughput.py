"""Scenarios 1, 2 and 2b: requests/s and p99 latency with wrk, appd beside
gunicorn, sync and gthread workers."""

from __future__ import annotations

import os
import resource

import psutil

import load
import wsgi_servers
from common import FLASK, HELLO, NOISY, Context, Row, median
from servers import BenchError


# --- 1 and 2: throughput -------------------------------------------------------

def _busy_cpu_seconds() -> float:
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def _tree_cpu_seconds(pids) -> float:
    total = 0.0
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _measure_throughput(ctx: Context, server, seconds: float, connections: int = 32) -> dict:
    """One measured run, plus the CPU time that processes other than the server
    and the load client used meanwhile (another job on the machine skews a run)."""
    pids = server.tree()
    before = (_busy_cpu_seconds(), _tree_cpu_seconds(pids), _children_cpu_seconds())
    if ctx.use_wrk:
        result = load.run_wrk(server.url, threads=2, connections=connections, duration=seconds)
    else:
        result = load.run_pyload(server.address, seconds, connections=connections)
    after = (_busy_cpu_seconds(), _tree_cpu_seconds(pids), _children_cpu_seconds())
    busy, ours, client = (b - a for a, b in zip(before, after))
    result["server_cpu_s"] = ours
    if result.get("requests"):  # the server's CPU per request: steadier than req/s on a busy machine
        result["server_cpu_us_per_request"] = ours / result["requests"] * 1e6
    result["other_cpu_s"] = max(0.0, busy - ours - client)
    result["other_cpu_share"] = result["other_cpu_s"] / (seconds * (os.cpu_count() or 1))
    return result


def throughput(ctx: Context, label: str, app: str, workers: int, connections: int = 32,
               show_errors: bool = False, show_max: bool = False, **server_options):
    """requests/s and p99 with `connections` connections (32 by default); the runs
    alternate between the two servers (both idle but up) so a drift of the machine
    hits both alike. server_options (threads, keepalive) go to both servers."""
    with ctx.appd(app, workers, **server_options) as appd, \
            ctx.gunicorn(app, workers, **server_options) as gunicorn:
        servers = [appd, gunicorn]
        for server in servers:  # warm-up, not counted
            _measure_throughput(ctx, server, 2.0, connections)
        runs = {"appd": [], "gunicorn": []}
        for i in range(ctx.runs):
            for server in (servers if i % 2 == 0 else servers[::-1]):
                result = _measure_throughput(ctx, server, ctx.wrk_seconds, connections)
                runs[server.kind].append(result)
                ctx.log(f"  {label} {workers}w {server.kind}: {result['rps']:.0f} req/s, "
                        f"p99 {result['p99_s'] * 1000:.1f} ms, errors {result['errors']}, "
                        f"other processes used {result['other_cpu_share']:.0%} of the CPU")
    rps = {k: median(r["rps"] for r in v) for k, v in runs.items()}
    p99 = {k: median(r["p99_s"] for r in v) for k, v in runs.items()}
    errors = {k: sum(r["errors"] for r in v) for k, v in runs.items()}
    scenario = f"{label}, {workers} workers"
    other = max(r["other_cpu_share"] for v in runs.values() for r in v)
    noisy = f"noisy: other processes took up to {other:.0%} of the CPU in a run" if other > NOISY else ""
    rows = [
        Row(scenario, "requests/s", rps["appd"], rps["gunicorn"], "rps", "≥ 1.2×",
            rps["appd"] >= 1.2 * rps["gunicorn"], note=noisy),
        Row(scenario, "p99 latency", p99["appd"], p99["gunicorn"], "s", "≤ 1.0×",
            p99["appd"] <= p99["gunicorn"]),
    ]
    if show_max:
        worst = {k: max((r.get("max_s") for r in v if r.get("max_s") is not None), default=None)
                 for k, v in runs.items()}
        rows.append(Row(scenario, "max latency (all runs)", worst["appd"], worst["gunicorn"], "s"))
    if show_errors or errors["appd"] or errors["gunicorn"]:
        rows.append(Row(scenario, "errors (all runs)", errors["appd"], errors["gunicorn"], "count", "0",
                        errors["appd"] == 0))
    return rows, {"runs": runs, "workers": workers, "app": app, "connections": connections,
                  **server_options}


def _sync_throughput(ctx, label: str, app: str):
    """Sync workers, 2 and 4 of them."""
    rows, raw = [], {}
    for workers in (2, 4):
        r, raw[f"{workers}w"] = throughput(ctx, label, app, workers)
        rows += r
    return rows, raw


def hello_throughput(ctx):
    return _sync_throughput(ctx, "hello WSGI", HELLO)


def flask_throughput(ctx):
    return _sync_throughput(ctx, "Flask", FLASK)


def gthread_throughput(ctx):
    """Thread-pool workers with HTTP/1.1 keep-alive (wrk reuses its connections):
    32 connections, then 100 — more than the 2 × 4 threads, so most connections
    wait parked between requests and must not starve (their max latency and
    wrk's timeouts show it)."""
    if not ctx.use_wrk:  # the Python client opens a connection per request: no keep-alive to measure
        ctx.log("  gthread: skipped, the keep-alive load needs wrk")
        return [Row("hello WSGI gthread, keep-alive", "requests/s", None, None, "rps",
                    note="skipped: needs wrk")], {"skipped": "wrk not installed"}
    rows, raw = [], {}
    for connections in (32, 100):
        r, raw[f"{connections}c"] = throughput(
            ctx, f"hello WSGI gthread, 4 threads, {connections} keep-alive connections", HELLO, 2,
            connections=connections, show_errors=connections > 32, show_max=connections > 32,
            threads=4, keepalive=5)
        rows += r
    return rows, raw


# --- the fastest Python servers side by side (issue 20) ---------------------------

# Targets for appd / other server, requests/s (issue 20).
VERSUS_TARGETS = {("hello", "granian"): 0.7, ("flask", "granian"): 1.0,
                  ("hello", "gunicorn"): 2.5, ("flask", "gunicorn"): 2.5}


def _servers_for(ctx: Context, app: str, workers: int, threads: int | None):
    """appd, gunicorn, granian, uWSGI (and appd-base when APPD_BENCH_BASELINE is
    set), each with `workers` processes; `threads` for keep-alive (gthread) rows."""
    options = {"threads": threads, "keepalive": 5} if threads else {}
    kinds = [("appd", lambda: ctx.appd(app, workers, **options)),
             ("gunicorn", lambda: ctx.gunicorn(app, workers, **options)),
             ("granian", lambda: wsgi_servers.GranianWsgiServer(app, workers, ctx.dir("granian"), **options)),
             ("uwsgi", lambda: wsgi_servers.UwsgiServer(app, workers, ctx.dir("uwsgi"), **options))]
    if wsgi_servers.baseline_wanted():
        kinds.insert(1, ("appd-base", lambda: wsgi_servers.BaselineAppdServer(
            app, workers, ctx.dir("appd-base"), **options)))
    wanted = os.environ.get("APPD_BENCH_SERVERS")  # e.g. "appd,appd-base": a quick before/after
    if wanted:
        kinds = [(kind, make) for kind, make in kinds if kind in wanted.split(",")]
    return kinds


def versus(ctx: Context, label: str, app_name: str, app: str, threads: int | None, workers: int = 2):
    """One row group: every server started at once (idle but up, so a drift of
    the machine hits all alike), warmed up, then measured in rounds whose order
    rotates. Returns rows appd vs each other server, and the raw runs."""
    runs: dict[str, list] = {}
    started = []
    try:
        for kind, make in _servers_for(ctx, app, workers, threads):
            try:
                started.append(make().start())
            except BenchError as exc:  # a server that cannot run here is a missing row, not a failed bench
                ctx.log(f"  {label}: {kind} did not start: {str(exc).splitlines()[0]}")
        for server in started:
            _measure_throughput(ctx, server, 2.0)  # warm-up, not counted
        rounds = max(ctx.runs, 2)
        for i in range(rounds):
            order = started[i % len(started):] + started[:i % len(started)]
            for server in order:
                result = _measure_throughput(ctx, server, ctx.wrk_seconds)
                runs.setdefault(server.kind, []).append(result)
                ctx.log(f"  {label} {server.kind}: {result['rps']:.0f} req/s, p99 {result['p99_s'] * 1000:.1f} ms, "
                        f"server CPU {result.get('server_cpu_us_per_request', 0):.0f} µs/request, "
                        f"errors {result['errors']}, other processes {result['other_cpu_share']:.0%} of the CPU")
    finally:
        for server in started:
            server.stop()
    rps = {k: median(r["rps"] for r in v) for k, v in runs.items()}
    p99 = {k: median(r["p99_s"] for r in v) for k, v in runs.items()}
    cpu = {k: median(r.get("server_cpu_us_per_request") for r in v) for k, v in runs.items()}
    other = max((r["other_cpu_share"] for v in runs.values() for r in v), default=0.0)
    noisy = f"noisy: other processes took up to {other:.0%} of the CPU" if other > NOISY else ""
    scenario = f"{label}, {workers} workers"
    rows = []
    for kind in [k for k in runs if k != "appd"]:
        goal = VERSUS_TARGETS.get((app_name, kind))
        ok = None if goal is None or "appd" not in rps else rps["appd"] >= goal * rps[kind]
        rows.append(Row(scenario, f"requests/s vs {kind}", rps.get("appd"), rps[kind], "rps",
                        f"≥ {goal}×" if goal else "", ok, note=noisy))
        rows.append(Row(scenario, f"p99 latency vs {kind}", p99.get("appd"), p99[kind], "s"))
        rows.append(Row(scenario, f"server CPU µs per request vs {kind}", cpu.get("appd"), cpu[kind], "us"))
    errors = sum(r["errors"] for r in runs.get("appd", []))
    rows.append(Row(scenario, "appd errors (all runs)", errors, None, "count", "0", errors == 0))
    return rows, {"runs": runs, "workers": workers, "threads": threads, "app": app}


def fastest_servers(ctx: Context):
    """hello WSGI and Flask, 2 workers each: per connection (appd and gunicorn
    sync, uWSGI --http-socket) and keep-alive (gthread with 4 threads, uWSGI
    --http11-socket with 4 threads); granian keeps connections alive in both."""
    if not ctx.use_wrk:
        ctx.log("  throughput: skipped, needs wrk")
        return [Row("throughput vs granian, uWSGI", "requests/s", None, None, "rps", note="skipped: needs wrk")], {}
    rows, raw = [], {}
    apps = os.environ.get("APPD_BENCH_APPS", "hello,flask").split(",")
    modes = os.environ.get("APPD_BENCH_MODES", "sync,gthread").split(",")
    for app_name, app, app_label in (("hello", HELLO, "hello WSGI"), ("flask", FLASK, "Flask")):
        if app_name not in apps:
            continue
        for threads, mode in ((None, "sync, per connection"), (4, "gthread 4 threads, keep-alive")):
            if ("gthread" if threads else "sync") not in modes:
                continue
            label = f"{app_label} {mode}"
            r, raw[label] = versus(ctx, label, app_name, app, threads)
            rows += r
    return rows, raw
