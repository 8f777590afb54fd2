# personascope — set-up and checks. Each target creates .venv on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test lint demo bench mutate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first (the CPU build on this machine), so nothing else can pull another torch
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src

test: lint
	$(VENV)/bin/pytest -q --durations=15 tests

# inject known bugs one at a time into a copy of the source; every one must make the fast suite fail
mutate: $(STAMP)
	OMP_NUM_THREADS=2 $(PY) tests/mutations/mutate.py

demo: $(STAMP)
	$(VENV)/bin/personascope demo

bench: $(STAMP)
	for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
