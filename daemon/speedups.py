"""Which implementation of appd.http runs: the per-request modules compiled
with Cython, or their pure-Python sources (the fallback, always there).

tools/build_speedups.py (run by `make`) compiles MODULES into
daemon/http/_compiled/ under their own names (appd.http.request, ...) and
writes a manifest of the sources it compiled. appd/http/__init__.py puts that
directory first on the package's __path__ only when choose() says so:
every module is there for this interpreter, the manifest matches the sources
as they are now (a stale build never runs), and APPD_PURE_PYTHON is unset (or 0).
One directory either searched or not, so the two implementations are never
mixed in one process. This module imports nothing heavy: `appd --version`
reads it too."""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from pathlib import Path

# In import order: each one's cimports (.pxd) come before it.
MODULES = ("errors", "names", "validate", "relax", "request", "body", "response", "wsgi", "kept")
HTTP_DIR = Path(__file__).parent / "http"
COMPILED_DIR = HTTP_DIR / "_compiled"
MANIFEST = COMPILED_DIR / "sources.json"
PURE_ENV = "APPD_PURE_PYTHON"


def source_digests() -> dict[str, str]:
    """sha256 of each file the compiled modules are built from (.py and .pxd)."""
    digests = {}
    for name in MODULES:
        for suffix in (".py", ".pxd"):
            path = HTTP_DIR / (name + suffix)
            if path.exists():
                digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def compiled_path(name: str) -> Path:
    return COMPILED_DIR / (name + sysconfig.get_config_var("EXT_SUFFIX"))


def choose(environ=os.environ) -> tuple[str | None, str]:
    """(the directory of compiled modules to import, or None; why, in a few words)."""
    if environ.get(PURE_ENV, "0") != "0":
        return None, f"{PURE_ENV} is set"
    if not all(compiled_path(name).exists() for name in MODULES):
        return None, "not built for this Python (make speedups)"
    try:
        built = json.loads(MANIFEST.read_text())
    except (OSError, ValueError):
        return None, "no build manifest (make speedups)"
    if built.get("digests") != source_digests():
        return None, "sources changed since the build (make speedups)"
    return str(COMPILED_DIR), "built from these sources"


def http_impl() -> str:
    """'compiled' or 'python': what appd.http imported now in this environment runs."""
    return "compiled" if choose()[0] else "python"
