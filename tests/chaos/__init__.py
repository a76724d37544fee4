"""Reliability under faults: run with `make chaos` (a few minutes). The short
versions of these checks run inside `make test` from tests/test_reliability.py.

This folder is a package so that its modules import as `chaos.*` while tests/
(the harness: conftest, loadgen) is on sys.path."""
