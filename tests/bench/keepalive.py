"""Keep-alive clients through upgrades and reloads: 16 persistent connections
(http.client, POST of 100 bytes, 0-20 ms think time, no retries), appd
gthread beside gunicorn gthread (HUP, and USR2+TERM); then the same behind
nginx (`upstream { keepalive 16; }`) and HAProxy (`http-reuse always`),
counting the proxy's 5xx answers. The load client and the proxies are the
test suite's own (tests/loadgen.py, tests/proxies.py)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from loadgen import KeepAliveLoad  # noqa: E402
from proxies import PROXIES, find, running_proxy  # noqa: E402

from common import HELLO, Context, Row  # noqa: E402
from load import percentile  # noqa: E402
from servers import BenchError  # noqa: E402

CLIENTS = 16
GTHREAD = {"threads": 4, "keepalive": 5}
BEHIND_PROXY = {"threads": 4, "keepalive": 75}  # idle upstream connections outlive the proxy's


def soak(ctx: Context, address: str, operations, label: str) -> dict:
    """Run each of `operations` (callables) in turn under keep-alive load; the figures."""
    with KeepAliveLoad(address, clients=CLIENTS, max_seconds=1800, request_timeout=30) as load:
        time.sleep(1.0)  # a baseline before the first operation
        windows, errors = [], []
        for operation in operations:
            t0 = time.monotonic()
            try:
                operation()
            except BenchError as exc:
                errors.append(str(exc))
            windows.append((t0, time.monotonic()))
        time.sleep(1.0)
    results = load.snapshot()
    during = sorted(r.latency for r in results
                    if any(r.started <= end and r.started + r.latency >= start for start, end in windows))
    figures = {"requests": len(results), "failed": len(load.failures),
               "server_errors": sum(1 for r in results if r.status is not None and r.status >= 500),
               "reconnects": load.reconnects, "operations": len(operations), "operation_errors": errors,
               "p99_during_s": percentile(during, 99) if during else None,
               "max_during_s": during[-1] if during else None,
               "failures": sorted({r.error or f"HTTP {r.status}" for r in load.failures})[:5]}
    ctx.log(f"  {label}: {figures['requests']} requests, failed {figures['failed']}, 5xx "
            f"{figures['server_errors']}, reconnects {figures['reconnects']}, during ops p99 "
            f"{(figures['p99_during_s'] or 0) * 1000:.1f} ms max {(figures['max_during_s'] or 0) * 1000:.1f} ms"
            + (f", {len(errors)} op errors" if errors else ""))
    return figures


def _alternate(first, second, count: int) -> list:
    return [op for _ in range(count) for op in (first, second)]


def _soak_rows(scenario: str, a: dict, g: dict, reconnect_target: float | None) -> list[Row]:
    rows = [
        Row(scenario, "failed requests", a["failed"], g["failed"], "count", "0", a["failed"] == 0,
            note=f"of {a['requests']} / {g['requests']}"),
        Row(scenario, "reconnects forced", a["reconnects"], g["reconnects"], "count",
            "≤ 1 % of gunicorn HUP" if reconnect_target is not None else "",
            a["reconnects"] <= reconnect_target if reconnect_target is not None else None),
        Row(scenario, "p99 latency during ops", a["p99_during_s"], g["p99_during_s"], "s"),
        Row(scenario, "max latency during ops", a["max_during_s"], g["max_during_s"], "s"),
    ]
    if a["operation_errors"] or g["operation_errors"]:
        rows.append(Row(scenario, "operations that failed", len(a["operation_errors"]),
                        len(g["operation_errors"]), "count", "0", not a["operation_errors"]))
    return rows


def direct(ctx: Context, n: int):
    with ctx.appd(HELLO, 2, **GTHREAD) as appd:
        a_up = soak(ctx, appd.address, [lambda: appd.operation("upgrade")] * n, f"appd upgrade ×{n}")
        a_re = soak(ctx, appd.address, [lambda: appd.operation("reload")] * n, f"appd reload ×{n}")
    with ctx.gunicorn(HELLO, 2, **GTHREAD) as gunicorn:
        g_up = soak(ctx, gunicorn.address, [gunicorn.usr2_upgrade] * n, f"gunicorn USR2+TERM ×{n}")
        g_re = soak(ctx, gunicorn.address, [gunicorn.hup] * n, f"gunicorn HUP ×{n}")
    target = 0.01 * g_re["reconnects"]
    rows = (_soak_rows(f"keep-alive, gthread: upgrade ×{n} (gunicorn: USR2+TERM)", a_up, g_up, target)
            + _soak_rows(f"keep-alive, gthread: reload ×{n} (gunicorn: HUP)", a_re, g_re, target))
    return rows, {"appd_upgrade": a_up, "appd_reload": a_re, "gunicorn_usr2_term": g_up, "gunicorn_hup": g_re}


def behind(ctx: Context, name: str, n: int):
    scenario = f"keep-alive behind {name}: {n} upgrades + {n} reloads (gunicorn: USR2+TERM, HUP)"
    if find(name) is None:
        ctx.log(f"  {name}: not installed, skipped")
        return [Row(scenario, "5xx from the proxy", None, None, "count", note=f"skipped: no {name}")], {}
    raw = {}
    with ctx.appd(HELLO, 2, **BEHIND_PROXY) as appd, running_proxy(name, ctx.dir(name), appd.address) as proxy:
        ops = _alternate(lambda: appd.operation("upgrade"), lambda: appd.operation("reload"), n)
        raw["appd"] = soak(ctx, proxy.address, ops, f"appd behind {name}")
    with ctx.gunicorn(HELLO, 2, **BEHIND_PROXY) as gunicorn, \
            running_proxy(name, ctx.dir(name), gunicorn.address) as proxy:
        raw["gunicorn"] = soak(ctx, proxy.address, _alternate(gunicorn.usr2_upgrade, gunicorn.hup, n),
                               f"gunicorn behind {name}")
    a, g = raw["appd"], raw["gunicorn"]
    rows = [Row(scenario, "5xx from the proxy", a["server_errors"], g["server_errors"], "count", "0",
                a["server_errors"] == 0, note=f"of {a['requests']} / {g['requests']}"),
            Row(scenario, "failed requests (5xx or closed)", a["failed"], g["failed"], "count", "0",
                a["failed"] == 0),
            Row(scenario, "max latency during ops", a["max_during_s"], g["max_during_s"], "s")]
    return rows, raw


def keepalive_soak(ctx: Context):
    n = ctx.operations
    rows, raw = direct(ctx, n)
    raw = {"direct": raw}
    for name in PROXIES:
        proxy_rows, raw[name] = behind(ctx, name, n)
        rows += proxy_rows
    return rows, raw
