# The two commands a new user needs: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run test bench chaos clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Serve the built-in demo app on 127.0.0.1:8000 (control socket at the default path).
run: $(STAMP)
	$(VENV)/bin/appd start --bind 127.0.0.1:8000

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) tests/bench/run.py

chaos: $(STAMP)
	$(PY) -m pytest -q tests/chaos

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
