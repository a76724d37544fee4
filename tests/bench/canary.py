"""Canary and probation upgrades (issue 21), 4 workers under load (16
connections, a new connection per request):

- a release answering 500 on 30 % of requests: failed requests of a plain
  upgrade (counted over the same window a probation would watch, i.e. until
  someone acts), of `--canary 1` with probation = 10, and of probation alone;
  the time from the limit being crossed (the daemon's probation_failed event)
  to the rollback done, and from the first 5xx to that decision;
- a good release through `--canary 1`: failed requests, and the seconds it adds
  to an upgrade (by design about `probation`);
- a release whose workers crash on their first request, through `--canary 1`:
  rolled back, and no request failed once it was over.

    make bench BENCH_ARGS="--quick --only canary"
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import load
from servers import BIN, BenchError

from common import Context, Row

_GOOD = '''
def app(environ, start_response):
    start_response("200 OK", [("Content-Length", "3")])
    return [b"{name}\\n"]
'''
_FAILING = '''
import itertools
counter = itertools.count()

def app(environ, start_response):
    if next(counter) % 10 < 3:
        start_response("500 Internal Server Error", [("Content-Length", "4")])
        return [b"500\\n"]
    start_response("200 OK", [("Content-Length", "3")])
    return [b"bad\\n"]
'''
_CRASHING = '''
import os

def app(environ, start_response):
    os._exit(1)
'''
PROBATION = 10.0


class Releases:
    """releases/N directories and a `current` symlink the appd runs from (chdir)."""

    def __init__(self, root: Path):
        self.root, self.count = root, 0
        self.current = root / "current"
        self.deploy(_GOOD.format(name="v1"))

    def deploy(self, source: str) -> None:
        self.count += 1
        directory = self.root / "releases" / str(self.count)
        directory.mkdir(parents=True)
        (directory / "bench_canary.py").write_text(source)
        swap = self.root / "current.new"
        swap.symlink_to(directory)
        os.replace(swap, self.current)


def _timed_ctl(appd, *args: str) -> tuple[int, list[tuple[float, dict]]]:
    """appdctl --json ARGS, each event and the final object stamped with its arrival time."""
    proc = subprocess.Popen([str(BIN / "appdctl"), "--socket", appd.socket, "--json", *args],
                            stdout=subprocess.PIPE, text=True)
    stamped, pending = [], ""
    for line in proc.stdout:
        pending += line
        try:
            stamped.append((time.monotonic(), json.loads(pending)))
            pending = ""
        except ValueError:
            continue  # the final object spans lines
    return proc.wait(300), stamped


def _first(stamped, event: str) -> float | None:
    return next((t for t, message in stamped if message.get("event") == event), None)


def _run(ctx: Context, name: str, release: str, env: dict, ctl_args: tuple, observe: float) -> dict:
    """One upgrade to `release` under load; the load runs `observe` s after it returns."""
    root = ctx.dir(f"canary-{name}")
    releases = Releases(root)
    settings = {"APPD_CHDIR": str(releases.current), "PYTHONDONTWRITEBYTECODE": "1", **env}
    with ctx.appd("bench_canary:app", 4, env=settings) as appd:
        client = load.PyLoad(appd.address, "/", connections=16, processes=2, timeout=30.0, max_seconds=300.0)
        with client:
            time.sleep(1.0)
            releases.deploy(release)
            began = time.monotonic()
            code, stamped = _timed_ctl(appd, "upgrade", *ctl_args)
            ended = time.monotonic()
            time.sleep(observe)
            after = time.monotonic()
            time.sleep(1.0)
            result = client.stop()
        final = stamped[-1][1] if stamped else {}
        _repair(appd, releases)
    decided = _first(stamped, "probation_failed")
    first_5xx = next((result.starts[i] + result.latencies[i] for i in range(result.count)
                      if result.codes[i] == 5 and result.starts[i] >= began), None)
    return {"exit_code": code, "outcome": final.get("outcome") or (final.get("error") or {}).get("code"),
            "evidence": (final.get("error") or {}).get("evidence") or final.get("observed"),
            "requests": result.count, "rps": round(result.rps(), 1), "failed": sum(result.failures().values()), "failures": result.failures(),
            "failed_after_operation": sum(result.failures([(ended, after)]).values()),
            "operation_s": round(ended - began, 3),
            "decision_to_rollback_s": None if decided is None else round(ended - decided, 3),
            "first_5xx_to_decision_s": None if decided is None or first_5xx is None
            else round(decided - first_5xx, 3)}


def _repair(appd, releases: Releases) -> None:
    """After a plain upgrade to a bad release, someone deploys the good one again."""
    if "bad" in (releases.current / "bench_canary.py").read_text() or "_exit" in \
            (releases.current / "bench_canary.py").read_text():
        releases.deploy(_GOOD.format(name="v3"))
        try:
            appd.operation("upgrade")
        except BenchError:
            pass


def canary(ctx: Context):
    window = PROBATION
    base = {"APPD_ROLLBACK_MIN_REQUESTS": "20"}
    watched = {**base, "APPD_PROBATION": f"{PROBATION:g}"}
    good_probation = 3.0 if ctx.quick else PROBATION
    raw = {
        "plain_30pct": _run(ctx, "plain", _FAILING, base, (), window),
        "canary_30pct": _run(ctx, "canary", _FAILING, watched, ("--canary", "1"), 2.0),
        "probation_30pct": _run(ctx, "probation", _FAILING, watched, (), 2.0),
        "plain_good": _run(ctx, "plain-good", _GOOD.format(name="v2"), base, (), 1.0),
        "canary_good": _run(ctx, "canary-good", _GOOD.format(name="v2"),
                            {**base, "APPD_PROBATION": f"{good_probation:g}"}, ("--canary", "1"), 1.0),
        "canary_crash": _run(ctx, "canary-crash", _CRASHING, watched, ("--canary", "1"), 2.0),
    }
    for name, figures in raw.items():
        ctx.log(f"  {name}: {figures}")
    plain, can, prob = raw["plain_30pct"], raw["canary_30pct"], raw["probation_30pct"]
    # The canary is 1 worker of 5 accepting: its share of 10 s of traffic, 30 % of it failing.
    share = 0.3 * can["rps"] * PROBATION / 5
    scenario = "30 %-500 release, 4 workers"
    rows = [
        Row(scenario, f"failed requests, plain upgrade ({window:g} s until someone acts)", plain["failed"], None,
            "count"),
        Row(scenario, "failed requests, --canary 1, probation 10", can["failed"], None, "count",
            "≤ the canary's share of 10 s", can["failed"] <= share, note=f"share ≈ {share:.0f}"),
        Row(scenario, "failed requests, probation 10 alone", prob["failed"], None, "count"),
        Row(scenario, "limit crossed -> rolled back, --canary 1", can["decision_to_rollback_s"], None, "s",
            "< 1 s", (can["decision_to_rollback_s"] or 99) < 1.0),
        Row(scenario, "limit crossed -> rolled back, probation alone", prob["decision_to_rollback_s"], None, "s",
            "< 1 s", (prob["decision_to_rollback_s"] or 99) < 1.0),
        Row(scenario, "first 5xx -> decision, --canary 1", can["first_5xx_to_decision_s"], None, "s",
            note="heartbeat-batched reports"),
        Row("good release, 4 workers", "failed requests, --canary 1", raw["canary_good"]["failed"], None, "count",
            "0", raw["canary_good"]["failed"] == 0),
        Row("good release, 4 workers", f"seconds added by --canary 1 (probation {good_probation:g})",
            round(raw["canary_good"]["operation_s"] - raw["plain_good"]["operation_s"], 3), None, "s"),
        Row("crash-on-first-request release", "rolled back (exit 1), failed once over",
            raw["canary_crash"]["failed_after_operation"], None, "count", "0",
            raw["canary_crash"]["exit_code"] == 1 and raw["canary_crash"]["failed_after_operation"] == 0),
    ]
    return rows, raw
