# workflow-bff. `make run` starts the demo; `make test` runs every check. Needs Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
NODE_STAMPS := tests/node/node_modules/.installed examples/react-chat/node_modules/.installed

.PHONY: run test lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m proxy demo --port $(PORT)

test: lint typecheck pytest

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy tests
	$(BIN)/ruff format --check proxy tests

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

pytest: $(VENV)/.installed-dev $(NODE_STAMPS)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The real AI SDK clients (tests/node) and the example app the browser test builds, at the exact
# versions of their lockfiles, installed once per lockfile change. Without npm this only says so:
# the tests that need them skip locally and fail under CI=true.
%/node_modules/.installed: %/package.json %/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $* && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: not installing $*"; fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info test-artifacts
	rm -rf tests/node/node_modules examples/react-chat/node_modules
