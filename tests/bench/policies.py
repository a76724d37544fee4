"""Production policies (issue 19's figures):

  13a  drain_delay = 5 vs 0 behind HAProxy health-checking /readyz (every 1 s,
       fall 2): client errors while one of two appd instances drains (target 0)
  13b  peak processes, peak workers and peak RSS of the service during an
       upgrade, 8 workers, max_surge = 1 vs the default (whole target), and
       how long the upgrade takes (target with max_surge=1: ≤ 9 workers)

The Ansible rollout's figures are the `ansible` scenario (fleet.py)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import HELLO, Context, Row  # noqa: E402
from servers import free_port  # noqa: E402

DRAIN_DELAYS = (5.0, 0.0)
CHECK_INTER, CHECK_FALL = 1.0, 2


def _tree(pid: int) -> tuple[list[psutil.Process], int]:
    """appd's processes (daemon, masters, workers) and how many are workers."""
    try:
        root = psutil.Process(pid)
        masters = root.children()
        workers = [w for m in masters for w in m.children(recursive=True)]
        return [root, *masters, *workers], len(workers)
    except psutil.Error:
        return [], 0


def _sample_peaks(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peak process count, worker count and summed RSS of appd's whole tree."""
    while not stop.is_set():
        rss = 0
        processes, workers = _tree(pid)
        for process in processes:
            try:
                rss += process.memory_info().rss
            except psutil.Error:
                pass
        peaks["processes"] = max(peaks.get("processes", 0), len(processes))
        peaks["workers"] = max(peaks.get("workers", 0), workers)
        peaks["rss"] = max(peaks.get("rss", 0), rss)
        stop.wait(0.02)


def _upgrade_peaks(ctx: Context, surge: int | None) -> dict:
    env = {"APPD_MAX_SURGE": str(surge)} if surge else {}
    with ctx.appd(HELLO, 8, env=env) as appd:
        stop, peaks = threading.Event(), {}
        sampler = threading.Thread(target=_sample_peaks, args=(appd.main_pid(), stop, peaks), daemon=True)
        sampler.start()
        time.sleep(0.2)  # the sampler's first pass sees the steady state
        steady = dict(peaks)
        seconds = appd.operation("upgrade")
        stop.set()
        sampler.join(10)
    return {"seconds": seconds, "peak_processes": peaks["processes"], "peak_workers": peaks["workers"],
            "peak_rss": peaks["rss"], "steady_processes": steady.get("processes"), "steady_rss": steady.get("rss")}


def surge_rows(ctx: Context):
    default, surge1 = _upgrade_peaks(ctx, None), _upgrade_peaks(ctx, 1)
    ctx.log(f"  upgrade, 8 workers: default {default}, max_surge=1 {surge1}")
    rows = []
    for name, raw in (("default (whole target)", default), ("max_surge=1", surge1)):
        scenario = f"upgrade, 8 workers, {name}"
        bounded = name == "max_surge=1"
        rows += [Row(scenario, "peak workers", raw["peak_workers"], None, "count",
                     "≤ 9" if bounded else "", raw["peak_workers"] <= 9 if bounded else None),
                 Row(scenario, "peak processes (daemon, masters, workers)", raw["peak_processes"], None, "count",
                     note=f"steady {raw['steady_processes']}"),
                 Row(scenario, "peak RSS of the service", raw["peak_rss"], None, "bytes",
                     note=f"steady {raw['steady_rss'] / 1048576:.1f} MB"),
                 Row(scenario, "seconds per upgrade", raw["seconds"], None, "s")]
    return rows, {"upgrade_default": default, "upgrade_max_surge_1": surge1}


def _terminate(server) -> None:
    """SIGTERM, as systemd or Kubernetes stop it; returns once the daemon exited."""
    os.kill(server.main_pid(), signal.SIGTERM)
    server.proc.wait(60)


def _drain_behind_haproxy(ctx: Context, drain_delay: float) -> dict:
    from lb_drain import drain_one_under_load, haproxy_checking_readyz
    servers = [ctx.appd(HELLO, 2, env={"APPD_METRICS_BIND": f"127.0.0.1:{free_port()}",
                                       "APPD_DRAIN_DELAY": f"{delay:g}"})
               for delay in (drain_delay, 0.0)]
    with servers[0] as drained, servers[1] as staying:
        upstreams = [(s.address, s.env["APPD_METRICS_BIND"]) for s in (drained, staying)]
        with haproxy_checking_readyz(ctx.dir("haproxy"), upstreams, CHECK_INTER, CHECK_FALL) as proxy:
            t0 = time.monotonic()
            figures = drain_one_under_load(proxy.address, drain=lambda: _terminate(drained))
            figures["seconds"] = time.monotonic() - t0
    ctx.log(f"  drain_delay={drain_delay:g} behind HAProxy: {figures}")
    return figures


def drain_delay_rows(ctx: Context):
    scenario = f"drain behind HAProxy (/readyz checked every {CHECK_INTER:g} s, fall {CHECK_FALL})"
    try:
        raw = {f"drain_delay={d:g}": _drain_behind_haproxy(ctx, d) for d in DRAIN_DELAYS}
    except FileNotFoundError as exc:  # haproxy not installed: make proxies
        return [Row(scenario, "client errors during a drain", None, None, "count", note=str(exc))], {}
    rows = []
    for delay in DRAIN_DELAYS:
        figures = raw[f"drain_delay={delay:g}"]
        rows.append(Row(scenario, f"client errors, drain_delay={delay:g}", figures["errors"], None, "count",
                        "0" if delay else "(comparison)", figures["errors"] == 0 if delay else None,
                        note=f"of {figures['requests']} requests; {figures['kinds'] or 'none'}; "
                             f"drain took {figures['seconds']:.1f} s"))
    return rows, raw


def policies(ctx: Context):
    rows, raw = [], {}
    for function in (drain_delay_rows, surge_rows):
        r, raw[function.__name__] = function(ctx)
        rows += r
    return rows, raw
