# Two commands do everything on a fresh machine:
#   make run   - set up .venv and start the service on its embedded default (SQLite, CPU)
#   make test  - set up .venv and run lint, type checks and the whole test suite
PYTHON ?= python3.11
VENV ?= .venv
BIN = $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup run test services lint typecheck pytest

$(BIN)/.installed: pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON) on PATH"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/dmae-certify serve --host $(HOST) --port $(PORT)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy app cli domain worker models bench

# PostgreSQL and Redis for the service tests (DMAE_TEST_POSTGRES, DMAE_TEST_REDIS): one sentence
# saying what is missing, before anything else runs; creates the `test` database if need be.
services: setup
	@$(BIN)/python tests/preflight.py

pytest: setup
	$(BIN)/pytest

test: services lint typecheck pytest
