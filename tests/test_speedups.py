"""The compiled appd.http (tools/build_speedups.py) and its switch: which
implementation a fresh interpreter imports, APPD_PURE_PYTHON, a stale build
never used, and `appd --version` saying which one runs. (The HTTP tests
themselves run against the compiled build; `make test` runs the in-process
ones again under APPD_PURE_PYTHON=1.)"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from appd import speedups
from conftest import APPD, copy_of_appd

PROBE = "import appd.http as h, appd.http.request as r; print(h.IMPL, r.__file__, h.IMPL_REASON, sep='|')"


def probe(env_extra: dict | None = None, pythonpath: str | None = None) -> tuple[str, str, str]:
    env = {k: v for k, v in os.environ.items() if k != speedups.PURE_ENV}
    env.update(env_extra or {})
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True,
                         timeout=60, check=True)
    impl, path, reason = out.stdout.strip().split("|")
    return impl, path, reason


# A build matching the sources (make test rebuilds a stale one first).
needs_build = pytest.mark.skipif(speedups.choose(environ={})[0] is None,
                                 reason=f"appd.http compiled build: {speedups.choose(environ={})[1]}")


def test_pure_python_switch_imports_the_sources():
    impl, path, reason = probe({speedups.PURE_ENV: "1"})
    assert (impl, os.path.basename(path), reason) == ("python", "request.py", "APPD_PURE_PYTHON is set")


@needs_build
@pytest.mark.parametrize("switch", [{}, {speedups.PURE_ENV: "0"}])
def test_a_current_build_is_imported(switch):
    impl, path, _ = probe(switch)
    assert impl == "compiled"
    assert os.path.dirname(path).endswith("_compiled") and path.endswith(".so")


@needs_build
def test_a_stale_build_is_never_used(tmp_path):
    pkg = copy_of_appd(tmp_path)
    assert probe(pythonpath=str(pkg))[0] == "compiled"  # the copy's build matches its sources
    with open(pkg / "appd" / "http" / "names.py", "a") as f:
        f.write("\n# edited after the build\n")
    impl, path, reason = probe(pythonpath=str(pkg))
    assert (impl, path) == ("python", str(pkg / "appd" / "http" / "request.py"))
    assert reason == "sources changed since the build (make speedups)"


def test_version_names_the_http_implementation():
    def version(env_extra):
        env = {k: v for k, v in os.environ.items() if k != speedups.PURE_ENV} | env_extra
        return subprocess.run([APPD, "--version"], env=env, capture_output=True, text=True,
                              timeout=60, check=True).stdout.strip()
    assert version({speedups.PURE_ENV: "1"}).endswith("(http_impl: python)")
    assert version({}).endswith(f"(http_impl: {probe()[0]})")
