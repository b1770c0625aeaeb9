# workflow-bff. `make run` starts the demo; `make test` runs every check. Needs Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 8000
NODE_STAMPS := tests/node/node_modules/.installed examples/react-chat/node_modules/.installed

.PHONY: run test lint typecheck pytest bench bench-quick fuzz soak clean lock

# Every install is the locked set, exactly: requirements.lock (what the image runs, deploy/Dockerfile
# installs the same file) or requirements-dev.lock (that plus the dev and bench extras, for `make test`).
# Each file is checked against its hash and nothing is resolved at install time; the project itself
# goes on top without dependencies of its own, and `pip check` proves the set is complete.
LOCK := requirements.lock
DEV_LOCK := requirements-dev.lock
PIP_LOCKED := $(BIN)/python -m pip install --quiet --require-hashes --no-deps
PIP_PROJECT := $(BIN)/python -m pip install --quiet --no-deps --no-build-isolation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml $(LOCK) | $(BIN)/python
	$(PIP_LOCKED) -r $(LOCK)
	$(PIP_PROJECT) -e .
	$(BIN)/python -m pip check
	touch $@

$(VENV)/.installed-dev: pyproject.toml $(DEV_LOCK) | $(BIN)/python
	$(PIP_LOCKED) -r $(DEV_LOCK)
	$(PIP_PROJECT) -e .
	$(BIN)/python -m pip check
	touch $@

# Upgrading: `make lock` re-resolves both lock files to the newest releases pyproject.toml allows, with
# every file's hash, for every platform and Python 3.11 on (uv pip compile --universal); review the
# diff, run `make test`, commit. `make lock UPGRADE=` keeps today's pins and only follows changes to
# pyproject.toml; `make lock UPGRADE="--upgrade-package httpx"` moves one package. The runtime lock is
# resolved first and constrains the dev lock, so the two never disagree. pip and the build backend are
# locked too: the installs above use --no-build-isolation.
UV_VERSION := 0.13.9
UPGRADE ?= --upgrade
LOCK_FLAGS = --universal --python-version 3.11 --generate-hashes --custom-compile-command "make lock" --quiet
BUILD_REQUIRES = $(BIN)/python -c 'import tomllib; print("pip", *tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'
lock: | $(BIN)/python
	$(BIN)/python -m pip install --quiet "uv==$(UV_VERSION)"
	$(BUILD_REQUIRES) | $(BIN)/uv pip compile pyproject.toml - $(LOCK_FLAGS) $(UPGRADE) -o $(LOCK)
	$(BUILD_REQUIRES) | $(BIN)/uv pip compile pyproject.toml - --extra dev --extra bench $(LOCK_FLAGS) \
		$(UPGRADE) -c $(LOCK) -o $(DEV_LOCK)

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
# tests/node needs Node >= 22 (ai 7): its npm ci, and the tests' node scripts, run with the Node 24
# that tests/node/runtime installs from the npm registry (linux-x64; elsewhere the machine's node).
tests/node/node_modules/.installed: tests/node/runtime/node_modules/.installed
tests/node/node_modules/.installed: export PATH := $(CURDIR)/tests/node/runtime/node_modules/.bin:$(PATH)
%/node_modules/.installed: %/package.json %/package-lock.json
	@if command -v npm >/dev/null; then \
		cd $* && npm ci --no-audit --no-fund --loglevel=error && touch node_modules/.installed; \
	else echo "npm not found: not installing $*"; fi

# Side by side with nginx, bare relays and a direct connection (needs node and nginx): a few minutes;
# rewrites docs/PERFORMANCE.md and docs/performance.png. BENCH_ARGS="--help" lists the knobs.
bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench --out bench/out --docs docs $(BENCH_ARGS)

# The same harness with small numbers, in seconds: fails unless every target relays every byte exactly.
bench-quick: $(VENV)/.installed-dev
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
	rm -rf tests/node/node_modules tests/node/runtime/node_modules examples/react-chat/node_modules
