# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test speedups proxies bench-deps bench profile chaos clean

# A regular install, then the import packages in site-packages are replaced by
# symlinks to daemon/ and ctl/, so edits are live (like `flit install --symlink`).
# Not `pip install -e`: setuptools' editable finder costs ~20 ms at every
# interpreter start, i.e. every appdctl call and every new master.
define link_packages
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	rm -rf "$$site/appd" "$$site/appdctl" && \
	ln -s "$(CURDIR)/daemon" "$$site/appd" && ln -s "$(CURDIR)/ctl" "$$site/appdctl"
endef

# Before pip (re)installs appd: it would uninstall and rewrite appd's files
# through those links, in daemon/ itself, and package setuptools' stale
# build/lib (files long deleted here came back into daemon/).
define unlink_packages
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))') && \
	rm -rf "$$site/appd" "$$site/appdctl" build/lib build/bdist.*
endef

# Best effort: install Debian package $(2) when command $(1) is missing (as
# root, with apt-get); otherwise say what the missing tool means ($(3)).
define apt_install
	@command -v $(1) >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		{ apt-get install -y -qq $(2) >/dev/null 2>&1 || \
		  { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq $(2) >/dev/null 2>&1; }; }; } || \
		echo "$(1) not installed: $(3)"
endef

# appd.http's per-request modules compiled with Cython into daemon/http/_compiled
# (tools/build_speedups.py; daemon/speedups.py chooses at import, APPD_PURE_PYTHON=1
# forces the sources). Best effort: without Cython or gcc the pure-Python modules
# run. Kept when current, so `make test` rebuilds only after the sources change.
define build_speedups
	@$(PY) -c 'import Cython, setuptools' 2>/dev/null || $(PY) -m pip install --quiet 'cython>=3.0,<4' setuptools || \
		echo "Cython not installed: appd.http runs as pure Python"
	@$(PY) tools/build_speedups.py
endef

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(unlink_packages)
	$(PY) -m pip install --quiet '.[test]'
	$(link_packages)
	$(build_speedups)
	touch $(STAMP)

speedups: $(STAMP)
	$(build_speedups)

# Serve the built-in demo app on 127.0.0.1:8000 (control socket at the default path).
run: $(STAMP)
	$(VENV)/bin/appd start --bind 127.0.0.1:8000

# systemd-analyze and systemd-socket-activate (Debian's systemd package) let
# the unit-file and socket-activation tests run rather than skip; nginx and
# haproxy, the tests of appd behind a load balancer.
# Two pytest-xdist workers, each taking whole files (--dist loadfile: a module's
# shared daemon is started once and its tests keep their order); most of a test's
# time is waiting on daemons, so two at once fit on two cores. TEST_WORKERS=0
# runs serially.
# Then, when the compiled appd.http ran, its in-process tests once more against
# the pure-Python sources (about 14 s on two busy cores): both stay green.
TEST_WORKERS ?= 2
HTTP_LAYER_TESTS := tests/test_http_requests.py tests/test_http_responses.py tests/test_http_validation.py
test: $(STAMP) proxies speedups
	$(call apt_install,systemd-analyze,systemd,the systemd unit tests will skip)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile
	@if $(PY) -c 'import sys, appd.speedups as s; sys.exit(s.http_impl() != "compiled")'; then \
		echo "again with APPD_PURE_PYTHON=1: $(HTTP_LAYER_TESTS)"; \
		APPD_PURE_PYTHON=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile $(HTTP_LAYER_TESTS); fi

# nginx-light is Debian 12's smallest nginx; later releases have only nginx.
proxies:
	$(call apt_install,nginx,nginx-light,trying the nginx package)
	$(call apt_install,nginx,nginx,the tests behind nginx will skip)
	$(call apt_install,haproxy,haproxy,the tests behind HAProxy will skip)

# appd beside gunicorn 27 (about 15 minutes on 2 cores). Installs wrk from
# Debian when it can; without it a Python load client measures throughput.
# `make bench BENCH_ARGS="--quick --only hello,ctl"` for a short run.
bench-deps: $(STAMP)
	$(unlink_packages)
	$(PY) -m pip install --quiet '.[bench]'
	$(link_packages)
	$(call apt_install,wrk,wrk,throughput will be measured with the Python load client; make profile needs it)
	$(call apt_install,valgrind,valgrind,tests/bench/request_cpu.py --instructions needs it)

bench: bench-deps
	$(PY) tests/bench/run.py $(BENCH_ARGS)

# Where a worker's time goes under wrk load (py-spy, from the bench extras).
profile: bench-deps
	$(PY) tests/bench/hotpath.py $(PROFILE_ARGS)

# Faults under load, 100 upgrades, control-socket abuse, hypothesis fault injection,
# keep-alive clients direct and through nginx/HAProxy, stalled request heads, and
# the HTTP fuzzing of tests/test_conformance.py with 1500 examples (about 15
# minutes); prints its figures. APPD_CHAOS_SEED=N replays a run,
# APPD_CHAOS_SECONDS=N sets the soak, APPD_FUZZ_EXAMPLES=N the fuzzing (default:
# 400 fuzzed configs and commands, 1500 HTTP requests; `make test` runs fewer).
chaos: $(STAMP) proxies
	$(PY) -m pytest -q -s tests/chaos
	APPD_FUZZ_EXAMPLES=$${APPD_FUZZ_EXAMPLES:-1500} $(PY) -m pytest -q -s tests/test_conformance.py -k "fuzz or lost"

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info daemon/http/_compiled
