#!/usr/bin/env python3
"""appd beside gunicorn 27, measured in the same run on the same machine.

    python tests/bench/run.py [--quick] [--only NAME[,NAME]] [--json PATH]

Prints one table (appd, gunicorn, ratio = appd / gunicorn, target, ✓/✗) and
writes every raw measurement to a JSON file. Every server is started and
stopped here, on 127.0.0.1, each in its own process group; nothing is left
running afterwards (checked at the end).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402
import scenarios  # noqa: E402
import servers  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer and shorter runs (for development)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="scenarios to run, of: " + ", ".join(scenarios.SCENARIOS))
    parser.add_argument("--json", default=str(ROOT / "bench-results.json"), metavar="PATH",
                        help="where to write the results (default: bench-results.json at the repo root)")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python load client for throughput even if wrk is installed")
    args = parser.parse_args(argv)
    names = list(scenarios.SCENARIOS)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in scenarios.SCENARIOS]
        if unknown:
            parser.error(f"unknown scenario(s) {', '.join(unknown)}; choose from {', '.join(scenarios.SCENARIOS)}")
    args.names = names
    return args


def versions() -> dict:
    def out(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None
    gunicorn = out([str(servers.BIN / "gunicorn"), "--version"])
    wrk = out(["wrk", "--version"]) if load.wrk_path() else None
    appd = out([str(servers.BIN / "appd"), "--version"])
    return {"python": platform.python_version(),
            "gunicorn": gunicorn.split("version")[-1].strip(" ()") if gunicorn else None,
            "appd": appd.split()[-1] if appd else None,
            "wrk": wrk.split()[1].split("/")[-1] if wrk else None}


def machine() -> dict:
    return {"cores": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "load_average_at_start": os.getloadavg()}


# --- the table ------------------------------------------------------------------------

def fmt(value, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "rps":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"
    if unit == "bytes":
        return f"{value / 1024 / 1024:.1f} MB"
    if unit == "fraction":
        return f"{value * 100:.0f} %"
    if unit == "us":
        return f"{value:,.0f} µs"
    if unit == "count":
        return f"{value:,d}"
    return f"{value:g}"


def table(rows, header: str) -> str:
    head = ["scenario", "figure", "appd", "gunicorn", "appd/gunicorn", "target", ""]
    body = []
    for row in rows:
        ratio = row.ratio
        body.append([row.scenario, row.figure + (f" ({row.note})" if row.note else ""),
                     fmt(row.appd, row.unit), fmt(row.gunicorn, row.unit),
                     "–" if ratio is None else f"{ratio:.2f}×", row.target,
                     "" if row.ok is None else ("✓" if row.ok else "✗")])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    lines = [header, "",
             "| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    for r in body:
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
    return "\n".join(lines)


def header_line(info: dict, args, use_wrk: bool) -> str:
    v = info["versions"]
    runs = "1 run" if args.quick else "median of 3 runs"
    loader = (f"wrk {v['wrk']} -t2 -c32 -d{3 if args.quick else 10}s --latency" if use_wrk
              else "Python load client, 32 connections (wrk not installed)")
    return (f"appd {v['appd'] or '?'} vs gunicorn {v['gunicorn'] or '?'} (sync workers unless a row says "
            f"gthread; connections 32 unless a row says otherwise) — "
            f"{info['machine']['cores']} cores, Python {v['python']}, loopback; throughput: {loader}, {runs}"
            + ("; --quick" if args.quick else ""))


# --- main -------------------------------------------------------------------------------

def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    use_wrk = bool(load.wrk_path()) and not args.python_load
    info = {"started_at": datetime.datetime.now().isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "quick": args.quick, "load_client": "wrk" if use_wrk else "python",
            "scenarios": {}}
    if not use_wrk and not args.python_load:
        print("bench: wrk not found; throughput is measured with the Python load client", file=sys.stderr)
    workdir = Path(tempfile.mkdtemp(prefix="appd-bench-"))
    ctx = scenarios.Context(workdir=workdir, quick=args.quick, use_wrk=use_wrk,
                            log=lambda msg: print(msg, file=sys.stderr, flush=True))
    rows, failed = [], []
    t_start = time.monotonic()
    try:
        for name in args.names:
            function, title = scenarios.SCENARIOS[name]
            print(f"== {title}", file=sys.stderr, flush=True)
            t0 = time.monotonic()
            try:
                scenario_rows, raw = function(ctx)
            except (servers.BenchError, OSError, subprocess.SubprocessError) as exc:
                failed.append(name)
                info["scenarios"][name] = {"error": str(exc)}
                print(f"   {name} FAILED: {exc}", file=sys.stderr, flush=True)
                continue
            rows += scenario_rows
            info["scenarios"][name] = {"seconds": time.monotonic() - t0, "raw": raw,
                                       "rows": [dict(vars(r), ratio=r.ratio) for r in scenario_rows]}
            print(f"   ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping the servers", file=sys.stderr)
        failed.append("interrupted")
    finally:
        for server in list(servers.RUNNING):
            server.stop()
        killed = servers.kill_leftovers(servers.SEEN_PIDS, timeout=10)
    info["seconds"] = time.monotonic() - t_start
    info["machine"]["load_average_at_end"] = os.getloadavg()
    info["leftover_processes_killed"] = killed
    info["failed_scenarios"] = failed

    header = header_line(info, args, use_wrk)
    text = table(rows, header)
    print()
    print(text)
    misses = [r for r in rows if r.ok is False]
    print(f"\n{sum(r.ok is True for r in rows)} targets met, {len(misses)} missed"
          + (f"; scenarios that failed: {', '.join(failed)}" if failed else "")
          + f"; {info['seconds'] / 60:.1f} min; load average {info['machine']['load_average_at_start'][0]:.2f}"
          f" at start, {info['machine']['load_average_at_end'][0]:.2f} at end")
    if killed:
        print(f"bench: processes left behind had to be killed: {killed}", file=sys.stderr)
    info["table"] = text
    Path(args.json).write_text(json.dumps(info, indent=2, default=str) + "\n")
    print(f"results: {args.json}")
    if failed:
        print(f"bench: server logs kept in {workdir}", file=sys.stderr)
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed or killed else 0


if __name__ == "__main__":
    sys.exit(main())
