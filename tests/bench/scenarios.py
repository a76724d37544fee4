"""The benchmark scenarios. Each takes a Context and returns (rows, raw): rows
for the table (appd beside gunicorn, ratio = appd / gunicorn) and the raw
measurements for the JSON file."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import psutil

import load
from servers import BIN, AppdServer, BenchError, answering_pid, children, http_get, wait_for

from common import FLASK, HELLO, SLOW, Context, Row, median
from keepalive import keepalive_soak
from fleet import fleet
from policies import policies
from canary import canary
from throughput import fastest_servers, flask_throughput, gthread_throughput, hello_throughput
from conformance_bench import conformance
from slow_heads import slow_heads

# --- 3: zero downtime under load ------------------------------------------------

def under_load(ctx: Context, server, operation, count: int, label: str, make_load=None) -> dict:
    """Run `operation` `count` times, one after the other, under continuous load
    (32 closed-loop connections, a new connection per request, unless make_load
    makes another client), and account for every request."""
    client = make_load(server.address) if make_load else load.PyLoad(
        server.address, "/", connections=32, processes=4, timeout=30.0, max_seconds=600.0)
    with client:
        time.sleep(1.0)  # load before the first operation: the baseline
        windows, seconds, op_errors = [], [], []
        for _ in range(count):
            t0 = time.monotonic()
            try:
                seconds.append(operation())
            except BenchError as exc:
                op_errors.append(str(exc))
            windows.append((t0, time.monotonic()))
        time.sleep(1.0)  # and after the last one
        result = client.stop()
    during = result.latency_stats(windows)
    failures = result.failures()
    summary = {"requests": result.count, "rps": result.rps(), "failed": sum(failures.values()),
               "failures": failures, "during_ops": during, "whole_run": result.latency_stats(),
               "seconds_per_op": seconds, "median_seconds_per_op": median(seconds),
               "operation_errors": op_errors}
    ctx.log(f"  {label}: {result.count} requests, failed {summary['failed']} {failures or ''}, "
            f"during ops p99 {during['p99_s'] or 0:.3f} s max {during['max_s'] or 0:.3f} s, "
            f"{median(seconds) or 0:.2f} s per op" + (f", {len(op_errors)} op errors" if op_errors else ""))
    return summary


def zero_downtime(ctx: Context):
    rows, raw = [], {}
    n = ctx.operations
    for label, app in (("hello app", HELLO), ("2-s-import app", SLOW)):
        with ctx.appd(app, 2) as appd:
            a_up = under_load(ctx, appd, lambda: appd.operation("upgrade"), n, f"{label} appd upgrade ×{n}")
            a_re = under_load(ctx, appd, lambda: appd.operation("reload"), n, f"{label} appd reload ×{n}")
        with ctx.gunicorn(app, 2) as gunicorn:
            g_up = under_load(ctx, gunicorn, gunicorn.usr2_upgrade, n, f"{label} gunicorn USR2+TERM ×{n}")
            g_re = under_load(ctx, gunicorn, gunicorn.hup, n, f"{label} gunicorn HUP ×{n}")
        raw[label] = {"appd_upgrade": a_up, "appd_reload": a_re, "gunicorn_usr2_term": g_up,
                      "gunicorn_hup": g_re}
        for what, a, g in ((f"upgrade ×{n} (gunicorn: USR2+TERM)", a_up, g_up),
                           (f"reload ×{n} (gunicorn: HUP)", a_re, g_re)):
            scenario = f"{label}: {what}"
            slow_upgrade = app == SLOW and what.startswith("upgrade")
            rows += [
                Row(scenario, "failed requests", a["failed"], g["failed"], "count", "0", a["failed"] == 0,
                    note=f"of {a['requests']} / {g['requests']}"),
                Row(scenario, "max latency during ops", a["during_ops"]["max_s"], g["during_ops"]["max_s"], "s",
                    "< 0.5 s" if slow_upgrade else "",
                    (a["during_ops"]["max_s"] or 0) < 0.5 if slow_upgrade else None),
                Row(scenario, "p99 latency during ops", a["during_ops"]["p99_s"], g["during_ops"]["p99_s"], "s"),
                Row(scenario, "seconds per operation", a["median_seconds_per_op"], g["median_seconds_per_op"], "s"),
            ]
            errors = len(a["operation_errors"]) + len(g["operation_errors"])
            if errors:
                rows.append(Row(scenario, "operations that failed", len(a["operation_errors"]),
                                len(g["operation_errors"]), "count", "0", not a["operation_errors"]))
    return rows, raw


# --- 4: seconds per upgrade, demo app, 4 workers -------------------------------------

def upgrade_time(ctx: Context):
    n = ctx.upgrade_repeats
    with ctx.appd(HELLO, 4) as appd:
        a = [appd.operation("upgrade") for _ in range(n)]
    with ctx.gunicorn(HELLO, 4) as gunicorn:
        g = [gunicorn.usr2_upgrade() for _ in range(n)]
    ctx.log(f"  appd upgrade: {median(a):.3f} s, gunicorn USR2+TERM: {median(g):.3f} s")
    rows = [Row("hello app, 4 workers, idle", f"seconds per upgrade, median of {n}", median(a), median(g), "s",
                "< 1 s", median(a) < 1.0, note="gunicorn: USR2 to old master gone")]
    return rows, {"appd_upgrade_s": a, "gunicorn_usr2_term_s": g}


# --- 5: control client --------------------------------------------------------------

def _timed(cmd: list[str]) -> float:
    t0 = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise BenchError(f"{' '.join(cmd)} exited {done.returncode}: {done.stdout}{done.stderr}")
    return seconds


def control_client(ctx: Context):
    n = ctx.ctl_repeats
    with ctx.appd(HELLO, 2) as appd, ctx.gunicorn(HELLO, 2, control=True) as gunicorn:
        a_cmd = [str(BIN / "appdctl"), "--socket", appd.socket, "status"]
        g_cmd = [str(BIN / "gunicornc"), "-s", gunicorn.control_socket, "-c", "show workers"]
        _timed(a_cmd), _timed(g_cmd)  # warm the page cache
        a, g = [], []
        for _ in range(n):
            a.append(_timed(a_cmd))
            g.append(_timed(g_cmd))
    ctx.log(f"  appdctl status {median(a) * 1000:.1f} ms, gunicornc show workers {median(g) * 1000:.1f} ms")
    rows = [Row("control client, whole process", f"appdctl status vs gunicornc -c 'show workers' (median of {n})",
                median(a), median(g), "s", "≤ 0.5×", median(a) <= 0.5 * median(g))]
    return rows, {"appdctl_status_s": a, "gunicornc_show_workers_s": g}


# --- 6: memory ----------------------------------------------------------------------

def _rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def _worker_memory(pids) -> dict:
    uss, pss = [], []
    for pid in pids:
        info = psutil.Process(pid).memory_full_info()
        uss.append(info.uss)
        pss.append(info.pss)
    return {"uss": uss, "pss": pss, "median_uss": median(uss), "median_pss": median(pss)}


def _exercise(server, requests: int = 200) -> None:
    for _ in range(requests):
        status, _ = http_get(server.address, "/")
        if status != 200:
            raise BenchError(f"{server.kind} answered {status}")


def memory(ctx: Context):
    n = ctx.operations
    raw: dict = {}
    with ctx.appd(FLASK, 2) as appd:
        _exercise(appd)
        raw["appd_daemon_rss_start"] = _rss(appd.main_pid())
        for _ in range(n):
            appd.operation("upgrade")
        _exercise(appd)
        raw["appd_daemon_rss_after_upgrades"] = _rss(appd.main_pid())
    with ctx.gunicorn(FLASK, 2) as gunicorn:
        _exercise(gunicorn)
        raw["gunicorn_master_rss_start"] = _rss(gunicorn.main_pid())
        for _ in range(n):
            gunicorn.hup()
        _exercise(gunicorn)
        raw["gunicorn_master_rss_after_hups"] = _rss(gunicorn.main_pid())
    for preload in (False, True):
        for make in (ctx.appd, ctx.gunicorn):
            with make(FLASK, 2, preload=preload) as server:
                _exercise(server)
                mem = _worker_memory(server.worker_pids())
                raw[f"{server.kind}_worker_{'preload' if preload else 'no_preload'}"] = mem
    ctx.log("  memory: " + ", ".join(f"{k} {v / 2**20:.1f} MB" if isinstance(v, int) else f"{k} USS {v['median_uss'] / 2**20:.1f} MB" for k, v in raw.items()))

    def ratio(kind):
        return raw[f"{kind}_worker_preload"]["median_uss"] / raw[f"{kind}_worker_no_preload"]["median_uss"]

    mb = 1024 * 1024
    scenario = "memory (Flask app, 2 workers)"
    rows = [
        Row(scenario, "daemon RSS after start (gunicorn: master)", raw["appd_daemon_rss_start"],
            raw["gunicorn_master_rss_start"], "bytes", "≤ 30 MB", raw["appd_daemon_rss_start"] <= 30 * mb),
        Row(scenario, f"daemon RSS after {n} upgrades (gunicorn: master after {n} HUPs)",
            raw["appd_daemon_rss_after_upgrades"], raw["gunicorn_master_rss_after_hups"], "bytes", "≤ 30 MB",
            raw["appd_daemon_rss_after_upgrades"] <= 30 * mb),
    ]
    for preload in (False, True):
        key = "preload" if preload else "no_preload"
        name = "with preload" if preload else "without preload"
        rows += [
            Row(scenario, f"worker USS {name}", raw[f"appd_worker_{key}"]["median_uss"],
                raw[f"gunicorn_worker_{key}"]["median_uss"], "bytes"),
            Row(scenario, f"worker PSS {name}", raw[f"appd_worker_{key}"]["median_pss"],
                raw[f"gunicorn_worker_{key}"]["median_pss"], "bytes"),
        ]
    rows.append(Row(scenario, "worker USS: preload / no preload", ratio("appd"), ratio("gunicorn"), "fraction",
                    "≤ 50 %", ratio("appd") <= 0.5))
    return rows, raw


# --- 7: scale +1 to serving ----------------------------------------------------------

def _occupy(server, pids, seconds: float) -> list[threading.Thread]:
    """One slow request per existing worker, so that only a new worker can answer."""
    server.clear_busy_marks()
    threads = [threading.Thread(target=_quiet_get, args=(server.address, f"/sleep?s={seconds}", seconds + 20),
                                daemon=True) for _ in pids]
    for t in threads:
        t.start()
    wait_for(lambda: server.busy_marked(pids), 10, "every worker to be busy")
    return threads


def _quiet_get(address, path, timeout):
    try:
        http_get(address, path, timeout)
    except OSError:
        pass


def _scale_once(server, busy_seconds: float, via: str) -> dict:
    """via "cli": `appdctl scale +1` / `kill -TTIN` as processes; via "api": the
    appdctl.Client call / os.kill from this process (no process start-up)."""
    old = server.worker_pids()
    busy = _occupy(server, old, busy_seconds)
    answer: dict = {}

    def probe():
        try:
            answer["pid"] = answering_pid(server.address, "/", timeout=busy_seconds + 20)
        except (OSError, BenchError) as exc:
            answer["error"] = str(exc)
        answer["t"] = time.monotonic()

    t0 = time.monotonic()
    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    result: dict = {}
    if isinstance(server, AppdServer) and via == "cli":
        seconds, done = server.ctl("scale", "+1")
        if done.returncode != 0:
            raise BenchError(f"appdctl scale +1 exited {done.returncode}: {done.stdout}{done.stderr}")
        result["command_s"] = seconds
    elif isinstance(server, AppdServer):
        from appdctl import Client
        with Client(server.socket, timeout=30) as client:
            client.call("scale", delta=1)
        result["command_s"] = time.monotonic() - t0
    else:
        master = server.main_pid()
        if via == "cli":
            subprocess.run(["kill", "-TTIN", str(master)], check=True, timeout=10)
        else:
            os.kill(master, signal.SIGTTIN)
        wait_for(lambda: set(children(master)) - set(old), 10, "the TTIN worker to appear", 0.001)
        result["appeared_s"] = time.monotonic() - t0
    prober.join(busy_seconds + 25)
    result["serving_s"] = answer["t"] - t0 if "t" in answer else None
    result["new_worker_answered"] = answer.get("pid") not in old and "pid" in answer
    if not result["new_worker_answered"]:
        result["serving_s"] = None  # an old worker answered after its slow request: not a measurement
    for t in busy:
        t.join(busy_seconds + 25)
    server.remember()
    # Back to the original count before the next round.
    if isinstance(server, AppdServer):
        server.operation("scale", "-1")
        wait_for(lambda: len(server.worker_pids()) == len(old), 30, "appd back to its worker count", 0.05)
    else:
        master = server.main_pid()
        subprocess.run(["kill", "-TTOU", str(master)], check=True, timeout=10)
        wait_for(lambda: len(children(master)) == len(old), 30, "gunicorn back to its worker count", 0.05)
    return result


def scale_up(ctx: Context):
    n, busy_seconds = ctx.scale_repeats, 1.5
    raw = {}
    with ctx.appd(FLASK, 2, preload=True) as appd:
        for via in ("cli", "api"):
            raw[f"appd_{via}"] = [_scale_once(appd, busy_seconds, via) for _ in range(n)]
    with ctx.gunicorn(FLASK, 2, preload=True) as gunicorn:
        for via in ("cli", "api"):
            raw[f"gunicorn_{via}"] = [_scale_once(gunicorn, busy_seconds, via) for _ in range(n)]

    def med(key, field):
        return median(r[field] for r in raw[key])

    missed = sum(not r["new_worker_answered"] for runs in raw.values() for r in runs)
    a_serve = med("appd_cli", "serving_s")
    ctx.log(f"  scale +1 → serving: appd {a_serve}, api {med('appd_api', 'serving_s')}; "
            f"gunicorn {med('gunicorn_cli', 'serving_s')}, api {med('gunicorn_api', 'serving_s')}")
    scenario = "scale +1, Flask app with preload"
    rows = [
        Row(scenario, "command done (gunicorn: new worker pid seen)", med("appd_cli", "command_s"),
            med("gunicorn_cli", "appeared_s"), "s"),
        Row(scenario, "until the new worker answers (`appdctl scale +1` / `kill -TTIN`)", a_serve,
            med("gunicorn_cli", "serving_s"), "s", "≤ 100 ms", a_serve is not None and a_serve <= 0.1,
            note=f"{missed} rounds where no new worker answered" if missed else ""),
        Row(scenario, "until the new worker answers (in-process: appdctl.Client / os.kill)",
            med("appd_api", "serving_s"), med("gunicorn_api", "serving_s"), "s"),
    ]
    return rows, raw


def asgi(ctx: Context):
    from asgi_bench import run  # imports this module: loaded on use
    return run(ctx)


def metrics(ctx: Context):
    from metrics_bench import run  # imports this module: loaded on use
    return run(ctx)


SCENARIOS = {
    "hello": (hello_throughput, "1. hello-world WSGI throughput, 2 and 4 workers"),
    "flask": (flask_throughput, "2. Flask throughput, 2 and 4 workers"),
    "throughput": (fastest_servers, "2c. hello WSGI and Flask beside gunicorn, granian and uWSGI, "
                                    "2 workers, sync and gthread keep-alive"),
    "gthread": (gthread_throughput, "2b. gthread (4 threads, keep-alive) throughput, 32 and 100 connections"),
    "zero-downtime": (zero_downtime, "3. upgrades and reloads under load"),
    "upgrade-time": (upgrade_time, "4. seconds per upgrade, 4 workers"),
    "ctl": (control_client, "5. control client time"),
    "memory": (memory, "6. daemon RSS, worker USS/PSS"),
    "scale": (scale_up, "7. scale +1 to serving"),
    "keepalive": (keepalive_soak, "8. keep-alive clients through upgrades and reloads, direct and behind nginx/HAProxy"),
    "asgi": (asgi, "9. ASGI: asgi worker vs uvicorn, granian, gunicorn+UvicornWorker; upgrades, WebSockets"),
    "conformance": (conformance, "10. HTTP/1.1 conformance corpus (cases answered as expected)"),
    "slowheads": (slow_heads, "11. slow clients: stalled request heads beside normal requests, sync and gthread"),
    "metrics": (metrics, "12. metrics: cost on vs off, counters through upgrades, /metrics and /readyz latency"),
    "policies": (policies, "13. drain_delay behind HAProxy; max_surge: peak workers, RSS and time of an upgrade, 8 workers"),
    "ansible": (fleet, "14. Ansible rolling upgrade over three local hosts: time, broken-release outcome"),
    "canary": (canary, "15. canary and probation: a 30 %-500 release, a good one, a crashing one, 4 workers"),
}
