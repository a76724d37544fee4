#!/usr/bin/env python3
"""Compile appd.http's per-request modules with Cython into daemon/http/_compiled/
(which one runs: daemon/speedups.py). Run by `make`; never fails an install:
without Cython or a C compiler, or if compiling fails, it says so in one line
and exits 0, and the pure-Python modules run. A build whose manifest matches
the sources is kept (--force rebuilds).

    python tools/build_speedups.py [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG = ROOT / "build" / "speedups.log"


def load_speedups():
    """This checkout's daemon/speedups.py, whichever appd is installed."""
    spec = importlib.util.spec_from_file_location("appd_speedups", ROOT / "daemon" / "speedups.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def missing_tool() -> str | None:
    if importlib.util.find_spec("Cython") is None:
        return "Cython is not installed"
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        return f"no C compiler ({compiler})"
    return None


def compile_modules(speedups, work: Path) -> dict[str, Path]:
    """Build every module; {name: its .so}. Sources are reached through work/src/appd
    (a link to daemon/), so Cython names them appd.http.* and finds their .pxd."""
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension

    src = work / "src"
    src.mkdir()
    (src / "appd").symlink_to(ROOT / "daemon")
    os.chdir(src)
    # -O1: half the compile time of the interpreter's -O3, no slower here (the
    # generated code is mostly calls into the C API).
    extensions = [Extension(f"appd.http.{name}", [f"appd/http/{name}.py"], extra_compile_args=["-O1"])
                  for name in speedups.MODULES]
    # annotation_typing off: only the .pxd declarations type anything, so the
    # compiled modules keep the sources' Python semantics (no argument checks).
    extensions = cythonize(extensions, build_dir=str(work / "c"), language_level=3, quiet=True, nthreads=os.cpu_count() or 1,
                           compiler_directives={"annotation_typing": False})
    dist = Distribution({"name": "appd-speedups", "ext_modules": extensions})
    build = dist.get_command_obj("build_ext")
    build.build_lib, build.build_temp = str(work / "lib"), str(work / "obj")
    build.parallel = os.cpu_count() or 1
    dist.run_command("build_ext")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    return {name: work / "lib" / "appd" / "http" / (name + suffix) for name in speedups.MODULES}


def install(speedups, built: dict[str, Path], digests: dict[str, str]) -> None:
    """Into _compiled/, manifest last: until it is written, nothing there is used.
    os.replace, so a running worker keeps the file it has mapped."""
    speedups.MANIFEST.unlink(missing_ok=True)
    speedups.COMPILED_DIR.mkdir(exist_ok=True)
    for name, path in built.items():
        target = speedups.compiled_path(name)
        shutil.copyfile(path, target.with_name(target.name + ".new"))
        os.replace(target.with_name(target.name + ".new"), target)
    manifest = speedups.MANIFEST.with_name("sources.json.new")
    manifest.write_text(json.dumps({"digests": digests}, indent=1, sort_keys=True) + "\n")
    os.replace(manifest, speedups.MANIFEST)


@contextlib.contextmanager
def output_to(log) -> None:
    """stdout and stderr, the compiler's too (a child process), into the log."""
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            yield
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        os.close(saved[0]), os.close(saved[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if the build is current")
    args = parser.parse_args()
    speedups = load_speedups()
    if not args.force and speedups.choose(environ={})[0]:  # APPD_PURE_PYTHON does not stop a build
        print("appd.http speedups: up to date")
        return 0
    reason = missing_tool()
    if reason:
        print(f"appd.http speedups not built: {reason}; the pure-Python modules run")
        return 0
    digests = speedups.source_digests()  # what is compiled: a later edit makes the build stale
    LOG.parent.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="appd-speedups-") as work, open(LOG, "w") as log:
        try:
            with output_to(log):
                built = compile_modules(speedups, Path(work))
            install(speedups, built, digests)
        except (Exception, SystemExit) as exc:  # distutils ends a failed build with SystemExit
            print(f"appd.http speedups not built: {type(exc).__name__}: {exc} (see {LOG}); "
                  "the pure-Python modules run")
            return 0
        finally:
            os.chdir(ROOT)
    print(f"appd.http speedups built: {len(built)} modules in {speedups.COMPILED_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
