"""Production policies: what max_surge saves during an upgrade (peak worker
processes and RSS, and what it costs in upgrade time), 8 workers."""

from __future__ import annotations

import threading
import time

import psutil

from common import HELLO, Context, Row


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def _sample_peaks(pid: int, stop: threading.Event, peaks: dict) -> None:
    """Peak process count and peak summed RSS of appd's whole tree."""
    while not stop.is_set():
        rss = 0
        processes = _tree(pid)
        for process in processes:
            try:
                rss += process.memory_info().rss
            except psutil.Error:
                pass
        peaks["processes"] = max(peaks.get("processes", 0), len(processes))
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
    return {"seconds": seconds, "peak_processes": peaks["processes"], "peak_rss": peaks["rss"],
            "steady_processes": steady.get("processes"), "steady_rss": steady.get("rss")}


def policies(ctx: Context):
    default, surge1 = _upgrade_peaks(ctx, None), _upgrade_peaks(ctx, 1)
    ctx.log(f"  upgrade, 8 workers: default {default}, max_surge=1 {surge1}")
    rows = []
    for name, raw in (("default (whole target)", default), ("max_surge=1", surge1)):
        scenario = f"upgrade, 8 workers, {name}"
        rows += [Row(scenario, "peak processes (daemon, masters, workers)", raw["peak_processes"], None, "count",
                     note=f"steady {raw['steady_processes']}"),
                 Row(scenario, "peak RSS of the tree", raw["peak_rss"], None, "bytes"),
                 Row(scenario, "seconds per upgrade", raw["seconds"], None, "s")]
    return rows, {"upgrade_default": default, "upgrade_max_surge_1": surge1,
                  "not_measured": "drain_delay behind HAProxy (needs /readyz of issue 18); Ansible rollout "
                                  "time (tests/test_ansible.py runs it)"}
