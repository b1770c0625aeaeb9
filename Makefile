# workflow-bff. `make run` starts the demo; `make test` runs every check. Needs Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
NODE_STAMPS := tests/node/node_modules/.installed examples/react-chat/node_modules/.installed

.PHONY: run test lint typecheck pytest bench bench-quick fuzz soak clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

$(VENV)/.installed-bench: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	touch $@

run: $(VENV)/.installed
	$(BIN)/python -m proxy demo --port $(PORT)

test: lint typecheck pytest bench-quick

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check proxy tests bench
	$(BIN)/ruff format --check proxy tests bench

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

# Side by side with nginx, bare relays and a direct connection (needs node and nginx): a few minutes;
# rewrites docs/PERFORMANCE.md and docs/performance.png. BENCH_ARGS="--help" lists the knobs.
bench: $(VENV)/.installed-bench
	$(BIN)/python -m bench --out bench/out --docs docs $(BENCH_ARGS)

# The same harness with small numbers, in seconds: fails unless every target relays every byte exactly.
bench-quick: $(VENV)/.installed-bench
	$(BIN)/mypy bench
	$(BIN)/python -m bench --quick $(BENCH_ARGS)

# Far more generated bad input than `make test` sends: FUZZ_EXAMPLES cases per API operation
# (schemathesis, live proxy) and ten times as many per property of the input gates (hypothesis).
FUZZ_EXAMPLES ?= 1000
fuzz: $(VENV)/.installed-dev
	BFF_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) BFF_PROPERTY_EXAMPLES=$$(($(FUZZ_EXAMPLES) * 10)) \
		$(BIN)/python -m pytest tests/test_fuzz.py tests/test_properties.py --timeout=0 $(PYTEST_ARGS)

# Mixed traffic with random faults for SOAK_SECONDS, then: memory flat, nothing leaked, every stream
# exact or explicitly failed, metrics equal to what the clients saw. `make test` runs 20 seconds of it.
SOAK_SECONDS ?= 300
soak: $(VENV)/.installed-dev
	$(BIN)/python -m bench.soak --seconds $(SOAK_SECONDS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info test-artifacts
	rm -rf tests/node/node_modules examples/react-chat/node_modules
