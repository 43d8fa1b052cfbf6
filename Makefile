# Waypost: the README's two commands are `make demo` and `make test`; `make help` lists the rest.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# The interpreter the environment is built on: the system's CPython 3.11 when there is one with
# its venv module (a distribution's build is compiled with profile-guided and link-time
# optimisation, as the official Docker images are; it ran the segmenter's fold about a fifth
# faster than a plain source build, docs/stream-processing.md), else the first python3.11 on
# the PATH. `make setup PYTHON=...` picks another.
ifeq ($(origin PYTHON),undefined)
PYTHON := $(or $(shell /usr/bin/python3.11 -c 'import ensurepip' >/dev/null 2>&1 && echo /usr/bin/python3.11),python3.11)
endif
# Its absolute path: uv keeps an environment whose interpreter merely satisfies a bare name.
PYTHON_PATH := $(or $(shell command -v $(PYTHON) 2>/dev/null),$(PYTHON))
UV_VERSION := 0.13.8
UV := .local/uv/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
export PYTHONUNBUFFERED := 1

.PHONY: help setup demo test test-unit test-e2e check fmt up down status bench clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  make %-10s %s\n", $$1, $$2}'

$(UV):
	@echo "[setup] installing uv $(UV_VERSION) into .local/uv"
	@$(PYTHON) -m venv .local/uv && .local/uv/bin/pip install -q "uv==$(UV_VERSION)"

# The stamp names the interpreter: another one is a missing stamp, and rebuilds the environment.
SYNCED := $(VENV)/.synced$(subst /,-,$(PYTHON_PATH))

$(SYNCED): $(UV) pyproject.toml uv.lock
	@echo "[setup] syncing the Python environment from uv.lock on $(PYTHON_PATH)"
	@rm -f $(VENV)/.synced*
	@$(UV) sync --frozen --python $(PYTHON_PATH) --quiet
	@touch $@

setup: $(SYNCED) ## Install Python deps, fetch Kafka (Maven Central), build FerretDB (Go); cached
	@$(PY) deploy/local/stack.py setup

up: setup ## Start Kafka, FerretDB, the SMTP sandbox and the five services in the background
	@$(PY) deploy/local/stack.py up

down: ## Stop exactly what `make up` started
	@$(PY) deploy/local/stack.py down

status: ## Show which local processes run (pids)
	@$(PY) deploy/local/stack.py status

demo: setup ## The main job: start the stack, publish the scenario journeys, drive a storefront, summarise
	@$(PY) deploy/local/demo.py

test: setup ## Every test: unit, contract and end-to-end on real servers (tests/run.py starts them)
	@$(PY) -m tests.run

test-e2e: setup ## Only the end-to-end tests, one at a time, on a stack of their own
	@$(PY) -m pytest -m e2e

test-unit: $(SYNCED) ## Only the tests that need no server
	@$(PY) -m pytest -m "not e2e"

check: $(SYNCED) ## ruff, ruff format --check, mypy --strict, import-linter
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@$(VENV)/bin/mypy
	@$(VENV)/bin/lint-imports

fmt: $(SYNCED) ## Format and autofix
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

bench: setup ## Benchmarks (figures as ratios against a baseline measured in the same run)
	@$(PY) -m bench.ingest
	@$(PY) -m bench.timers
	@$(PY) -m bench.segmenter
	@$(PY) -m bench.dispatch
	@$(PY) -m bench.chaos
	@$(PY) -m bench.pipeline

clean: down ## Remove local state (keeps downloaded servers)
	rm -rf .local/stack .local/test-stack
