"""Run the HTTP/1.1 conformance corpus against appd and gunicorn 27, side by side.

    python tests/conformance/run.py [--servers appd,gunicorn] [--verbose]

Both servers run the same app (tests/apps/conformance_app.py) with gthread
workers and keep-alive, so pipelined cases get every answer they are owed.
Prints, per category, how many cases each server answered as expected, then
every case a server missed. Exit 1 if appd misses a case not marked `known:`
or answers 2xx to a smuggling case. (`make bench BENCH_ARGS="--only
conformance"` runs the same comparison inside the benchmark.)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TESTS = HERE.parent
sys.path[:0] = [str(HERE), str(TESTS / "bench")]

import corpus  # noqa: E402
import servers  # noqa: E402

SERVERS = {"appd": servers.AppdServer, "gunicorn": servers.GunicornServer}


def start(kind: str, workdir: Path):
    """One worker, two threads, keep-alive: the same shape for both servers."""
    server = SERVERS[kind]("conformance_app:app", 1, workdir / kind, threads=2, keepalive=2,
                           preload=kind == "gunicorn",  # gunicorn's readiness needs it (no marks)
                           env={"PYTHONPATH": str(TESTS / "apps")})
    return server.start()


def run_servers(kinds, workdir: Path, cases) -> dict[str, dict]:
    results = {}
    for kind in kinds:
        server = start(kind, workdir)
        try:
            results[kind] = corpus.run(("127.0.0.1", server.port), cases)
        finally:
            server.stop()
    return results


def misses(cases, result) -> list[str]:
    lines = []
    for case in cases:
        ok, outcome = result[case.id]
        if not ok:
            expected = ",".join("|".join(sorted(a)) for a in case.expect)
            note = f"  [known: {case.known}]" if case.known else ""
            lines.append(f"  {case.id}: expected {expected}, got {outcome.describe()}{note}")
    return lines


def report(cases, results, verbose: bool) -> str:
    out = [corpus.table(cases, results)]
    for kind, result in results.items():
        smuggled = corpus.accepted_smuggling(cases, result)
        out.append(f"\n{kind}: smuggling cases accepted (2xx): {len(smuggled)}"
                   + (f" {smuggled}" if smuggled else ""))
        missed = misses(cases, result)
        if missed and (verbose or kind == "appd"):
            out.append(f"{kind}: {len(missed)} cases not answered as expected:")
            out.extend(missed)
        elif missed:
            out.append(f"{kind}: {len(missed)} cases not answered as expected (--verbose lists them)")
    return "\n".join(out)


def appd_failures(cases, result) -> list[str]:
    """Misses that are not documented differences, plus any accepted smuggling."""
    unknown = [c.id for c in cases if not result[c.id][0] and not c.known]
    return unknown + corpus.accepted_smuggling(cases, result)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="appd,gunicorn")
    parser.add_argument("--verbose", action="store_true", help="list every server's misses")
    args = parser.parse_args(argv)
    kinds = [k.strip() for k in args.servers.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in SERVERS]
    if unknown:
        parser.error(f"unknown server(s) {unknown}; choose from {list(SERVERS)}")
    cases = corpus.load()
    with tempfile.TemporaryDirectory(prefix="appd-conformance-") as workdir:
        try:
            results = run_servers(kinds, Path(workdir), cases)
        finally:
            for server in list(servers.RUNNING):
                server.stop()
            servers.kill_leftovers(servers.SEEN_PIDS)
    print(report(cases, results, args.verbose))
    return 1 if "appd" in results and appd_failures(cases, results["appd"]) else 0


if __name__ == "__main__":
    sys.exit(main())
