# Every install goes through constraints.txt: an unpinned torch pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup up test test-all lint bench

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

up: setup
	$(VENV)/bin/pdserve up

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check cluster kernels loadtest tests

bench: setup
	$(PY) -m loadtest.offline_bench --repeat 3 --write BENCHMARKS.md
