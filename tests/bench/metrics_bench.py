"""Scenario 10, metrics (metrics_bind): what counting costs and what it guarantees.

  10a  hello throughput, 2 workers, metrics on vs off (target: within 3 %)
  10b  appd_requests_total before/after N upgrades under load, beside the
       requests the load client completed (target: equal within in-flight)
  10c  /metrics and /readyz latency while every worker is busy with a slow
       request, and during upgrades (target: p99 < 20 ms)

In the table the "gunicorn" column holds appd with metrics off (10a) or the
load client's count (10b)."""

from __future__ import annotations

import threading
import time

import load
from common import HELLO, Context, Row, median
from scenarios import _occupy, under_load
from servers import free_port, http_get
from throughput import _measure_throughput


def run(ctx: Context):
    rows, raw = [], {}
    for function in (cost, continuity, health_latency):
        r, raw[function.__name__] = function(ctx)
        rows += r
    return rows, raw


def _with_metrics(ctx: Context, workers: int = 2):
    server = ctx.appd(HELLO, workers, env={"APPD_METRICS_BIND": f"127.0.0.1:{free_port()}"})
    server.metrics = server.env["APPD_METRICS_BIND"]
    return server


def requests_total(server) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    status, body = http_get(server.metrics, "/metrics")
    return sum(s.value for f in text_string_to_metric_families(body.decode()) for s in f.samples
               if s.name == "appd_requests_total")


def cost(ctx: Context):
    """Interleaved rounds (off, on, then on, off, ...) so that a machine getting busier or
    quieter meanwhile weighs on both alike. Judged by the server's CPU time per request
    (median of each round's on/off ratio): on 2 cores shared with wrk, req/s moves by
    10 % between identical runs, CPU per request by far less; req/s is shown beside."""
    off, on = ctx.appd(HELLO, 2), _with_metrics(ctx)
    results = {"off": [], "on": [], "ratios": [], "cpu_off": [], "cpu_on": [], "cpu_ratios": []}
    rounds = 3 if ctx.quick else 7
    with off, on:
        for server in (off, on):
            _measure_throughput(ctx, server, 1.0)  # warm-up
        for i in range(rounds):
            pair = {}
            for label, server in ((("off", off), ("on", on)) if i % 2 == 0 else (("on", on), ("off", off))):
                pair[label] = _measure_throughput(ctx, server, ctx.wrk_seconds)
                results[label].append(pair[label]["rps"])
                results["cpu_" + label].append(pair[label].get("server_cpu_us_per_request"))
            if pair["on"]["rps"] and pair["off"]["rps"]:
                results["ratios"].append(pair["on"]["rps"] / pair["off"]["rps"])
            if results["cpu_on"][-1] and results["cpu_off"][-1]:
                results["cpu_ratios"].append(results["cpu_on"][-1] / results["cpu_off"][-1])
            ctx.log(f"  round {i + 1}: metrics off {pair['off']['rps']:.0f} req/s "
                    f"{results['cpu_off'][-1] or 0:.1f} µs/request, on {pair['on']['rps']:.0f} req/s "
                    f"{results['cpu_on'][-1] or 0:.1f} µs/request")
    rps_on, rps_off, ratio = median(results["on"]), median(results["off"]), median(results["ratios"])
    cpu_ratio = median(results["cpu_ratios"])
    ok = cpu_ratio is not None and cpu_ratio <= 1.03
    return [Row("metrics", f"server CPU µs per request, metrics on (gunicorn column: appd metrics off; "
                f"{rounds} interleaved rounds, median ratio {cpu_ratio or 0:.3f})",
                median(results["cpu_on"]), median(results["cpu_off"]), "us", "≤ 1.03×", ok),
            Row("metrics", f"hello req/s, metrics on (gunicorn column: off; median ratio {ratio or 0:.3f})",
                rps_on, rps_off, "rps", "(shown)", None)], results


def continuity(ctx: Context):
    n = ctx.operations
    with _with_metrics(ctx) as server:
        before = requests_total(server)
        summary = under_load(ctx, server, lambda: server.operation("upgrade"), n, f"metrics upgrade ×{n}")
        time.sleep(2.5)  # the last heartbeats' counts reach the daemon
        after = requests_total(server)
    counted = after - before
    completed = summary["requests"] - summary["failed"]
    ctx.log(f"  counted {counted:.0f}, load client completed {completed}")
    return [Row("metrics", f"requests counted across {n} upgrades (gunicorn column: client completed)",
                int(counted), completed, "count", "equal ± 32 in flight", abs(counted - completed) <= 32)], \
        {"counted": counted, "completed": completed, "load": summary}


def _probe(server, paths, stop: threading.Event, latencies: list) -> None:
    while not stop.is_set():
        for path in paths:
            t0 = time.perf_counter()
            status, _ = http_get(server.metrics, path, timeout=5)
            latencies.append(time.perf_counter() - t0)
        time.sleep(0.01)


def _p99(values) -> float | None:
    return load.percentile(sorted(values), 99) if values else None


def health_latency(ctx: Context):
    rows, raw = [], {}
    with _with_metrics(ctx) as server:
        pids = server.worker_pids()
        busy = _occupy(server, pids, 6.0)
        latencies: list = []
        stop = threading.Event()
        prober = threading.Thread(target=_probe, args=(server, ("/metrics", "/readyz"), stop, latencies))
        prober.start()
        time.sleep(3.0)
        stop.set()
        prober.join()
        raw["all_busy"] = latencies
        for t in busy:
            t.join(30)
        during: list = []
        stop = threading.Event()
        prober = threading.Thread(target=_probe, args=(server, ("/metrics", "/readyz"), stop, during))
        prober.start()
        for _ in range(ctx.upgrade_repeats):
            server.operation("upgrade")
        stop.set()
        prober.join()
        raw["during_upgrades"] = during
    for label, values in (("every worker busy", raw["all_busy"]), ("during upgrades", raw["during_upgrades"])):
        p99 = _p99(values)
        ctx.log(f"  /metrics+/readyz {label}: {len(values)} probes, p99 {(p99 or 0) * 1000:.1f} ms")
        rows.append(Row("metrics", f"/metrics, /readyz p99, {label}", p99, None, "s", "< 20 ms",
                        p99 is not None and p99 < 0.020))
    return rows, {k: {"count": len(v), "p99_s": _p99(v)} for k, v in raw.items()}
