"""probation.py in-process: the verdict is a pure function of the outcomes and
the limits; failing paths ride the metrics report bounded in size."""

from __future__ import annotations

import json

import pytest

from appd.metrics import WorkerCounts, merge, parse_deltas
from appd.probation import MAX_FAILURE_KEYS, Limits, Outcomes, note_failure, split_failures, verdict
from appd.config_values import _ratio as parse_ratio


def report(counts: WorkerCounts) -> dict:
    return parse_deltas(counts.take())


def observed(statuses_and_paths, ok: int = 0) -> Outcomes:
    """Outcomes after one worker answered `ok` 200s and the given (status, path) failures."""
    counts = WorkerCounts()
    for _ in range(ok):
        counts.observe("l:1", "GET", "200", 3, 0.001)
    for status, path in statuses_and_paths:
        counts.observe("l:1", "GET", status, 3, 0.001)
        note_failure(counts, path, status)
    outcomes = Outcomes()
    outcomes.record(*split_failures(merge({}, report(counts))), [])
    return outcomes


def test_a_30_percent_release_crosses_the_limit_with_its_evidence():
    outcomes = observed([("500", "/pay")] * 20 + [("503", "/search")] * 10, ok=70)
    assert outcomes.counts() == {"requests": 100, "errors": 30, "error_rate": 0.3, "crashes": 0, "timeouts": 0}
    assert "5xx ratio 0.300" in verdict(outcomes, Limits(0.05, 20))
    evidence = outcomes.evidence()
    assert evidence["failing_paths"] == [["/pay", 20], ["/search", 10]]
    assert evidence["failing_statuses"] == [["500", 20], ["503", 10]]


def test_too_few_requests_or_a_low_ratio_is_no_verdict():
    assert verdict(observed([("500", "/")] * 5), Limits(0.05, 20)) is None
    assert verdict(observed([("500", "/")], ok=99), Limits(0.05, 20)) is None


def test_two_crashes_are_a_crash_loop():
    outcomes = Outcomes()
    outcomes.record({}, {}, ["crash", "max_requests", "memory"])
    assert verdict(outcomes, Limits(0.05, 20)) is None
    outcomes.record({}, {}, ["timeout"])
    assert "crash" in verdict(outcomes, Limits(0.05, 20))


def test_failing_paths_are_bounded_per_report_and_kept_out_of_the_metrics():
    counts = WorkerCounts()
    for n in range(500):
        counts.observe("l:1", "GET", "500", 3, 0.001)
        note_failure(counts, f"/item/{n}|x" + "y" * 500, "500")
    text = counts.take()
    assert len(text) < 8000
    requests, failures = split_failures(json.loads(text))
    assert list(requests) == ["l:1|GET|5xx"]
    assert len(failures) == MAX_FAILURE_KEYS + 1 and failures[("500", "(other)")] == 500 - MAX_FAILURE_KEYS
    assert all("|" not in path and len(path) <= 120 for _, path in failures)


def test_outcomes_cross_a_reexec_as_plain_data():
    outcomes = observed([("500", "/")] * 3, ok=7)
    again = Outcomes(json.loads(json.dumps(outcomes.to_state())))
    assert again.evidence() == outcomes.evidence()


@pytest.mark.parametrize("bad", ["-0.1", "1.5", "lots", True])
def test_a_bad_ratio_is_refused_with_its_value(bad):
    with pytest.raises(ValueError):
        parse_ratio(bad)
