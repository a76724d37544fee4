"""8. HTTP/1.1 conformance: the raw-request corpus of tests/conformance, appd
beside gunicorn 27 (cases answered as expected per category; smuggling shapes
served). Counts, not timings: a loaded machine does not change them."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from common import Context, Row

RUNNER = Path(__file__).resolve().parent.parent / "conformance" / "run.py"


def _runner():
    # Loaded by path: tests/bench/run.py is also a module called `run`.
    spec = importlib.util.spec_from_file_location("conformance_run", RUNNER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def conformance(ctx: Context):
    runner = _runner()
    corpus = runner.corpus
    cases = corpus.load()
    results = runner.run_servers(("appd", "gunicorn"), ctx.dir("conformance"), cases)
    ctx.log(runner.report(cases, results, verbose=False))
    rows = []
    for category in corpus.CATEGORIES:
        ids = [c.id for c in cases if c.category == category]
        appd, gunicorn = (sum(results[k][i][0] for i in ids) for k in ("appd", "gunicorn"))
        rows.append(Row("conformance", f"{category}: answered as expected (of {len(ids)})",
                        appd, gunicorn, "count", "≥ gunicorn", appd >= gunicorn))
    smuggled = {k: len(corpus.accepted_smuggling(cases, results[k])) for k in results}
    rows.append(Row("conformance", "smuggling cases served (2xx)", smuggled["appd"],
                    smuggled["gunicorn"], "count", "0", smuggled["appd"] == 0))
    raw = {kind: {case_id: {"ok": ok, "got": outcome.describe()}
                  for case_id, (ok, outcome) in result.items()} for kind, result in results.items()}
    return rows, raw
