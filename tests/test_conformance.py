"""HTTP/1.1 conformance of a real appd: the raw-request corpus of
tests/conformance (each case answered as expected, none of the smuggling
shapes served) and hypothesis fuzzing of the request path (requests split
across recv calls, mangled requests; no worker lost)."""

from __future__ import annotations

import contextlib
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import http_fuzz
from conformance import corpus
from conftest import running_appd
from helpers import address_of, worker_pids

CASES = corpus.load()
# A few dozen in `make test`; `make chaos` sets thousands.
FUZZ_EXAMPLES = int(os.environ.get("APPD_FUZZ_EXAMPLES", "40"))


WORKERS = {
    # gthread with keep-alive, as tests/conformance/run.py runs it, so pipelined
    # cases get every answer; sync reads heads with the heartbeat and deadline.
    "gthread": ["--worker-class", "gthread", "--threads", "2", "--keepalive", "2"],
    "sync": ["--worker-class", "sync"],
}


@pytest.fixture(scope="module")
def appds(tmp_path_factory):
    """One appd per worker kind, started when first asked for."""
    with contextlib.ExitStack() as stack:
        def get(kind):
            if kind not in started:
                appd = stack.enter_context(running_appd(
                    tmp_path_factory.mktemp(kind), "conformance_app:app", "-w", "2", *WORKERS[kind]))
                appd.first_workers = worker_pids(appd)
                started[kind] = appd
            return started[kind]
        started = {}
        yield get


@pytest.fixture(scope="module")
def appd(appds):
    return appds("gthread")


@pytest.fixture(scope="module")
def address(appd):
    return address_of(appd)


def test_corpus_has_every_category_and_150_cases():
    assert len(CASES) >= 150
    assert {c.category for c in CASES} == set(corpus.CATEGORIES)


def test_corpus_answers_as_expected(appd, address):
    before = worker_pids(appd)
    results = corpus.run(address, CASES)
    table = corpus.table(CASES, {"appd": results})
    print("\n" + table)
    unexpected = [f"{c.id}: got {results[c.id][1].describe()}" for c in CASES
                  if not results[c.id][0] and not c.known]
    assert not unexpected, "\n".join(unexpected)
    # A documented difference that starts passing must lose its `known:` line.
    stale = [c.id for c in CASES if c.known and results[c.id][0]]
    assert not stale, f"these cases pass now; remove their known: line: {stale}"
    assert corpus.accepted_smuggling(CASES, results) == []
    assert worker_pids(appd) == before


FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])


@pytest.mark.parametrize("kind", list(WORKERS))
@FUZZ
@given(request=http_fuzz.valid_requests(), fractions=http_fuzz.split_fractions)
def test_fuzz_valid_requests_split_anywhere_are_served(appds, kind, request, fractions):
    data, body_length = request
    answer = http_fuzz.exchange(address_of(appds(kind)), http_fuzz.pieces(data, fractions))
    http_fuzz.check_valid(answer, body_length)


@pytest.mark.parametrize("kind", list(WORKERS))
@FUZZ
@given(data=st.one_of(http_fuzz.mangled_requests(), st.binary(max_size=300)),
       fractions=http_fuzz.split_fractions)
def test_fuzz_mangled_requests_get_sane_answers(appds, kind, data, fractions):
    answer = http_fuzz.exchange(address_of(appds(kind)), http_fuzz.pieces(data, fractions))
    http_fuzz.check_sane(answer)


@pytest.mark.parametrize("kind", list(WORKERS))
def test_no_worker_was_lost(appds, kind):
    # Runs after the corpus and the fuzz tests (file order): the same workers.
    appd = appds(kind)
    assert worker_pids(appd) == appd.first_workers
    assert "Traceback" not in appd.log() and "connection_failed" not in appd.log()
