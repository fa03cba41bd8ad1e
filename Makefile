# Two commands do everything on a fresh Debian/Ubuntu machine, as root:
#   make run    install what is needed, build the tiny image, start corral and a first VM "demo"
#   make test   install what is needed and run the whole test suite

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)

.PHONY: setup system ui run test test-unit lint bench clean cluster-demo cluster-down

setup: system $(STAMP) ui

# The web console's browser packages (xterm.js, uPlot), from npm with the lockfile, copied where the daemon serves them.
ui: src/corral/ui/static/vendor/xterm.js src/corral/ui/static/vendor/uplot.js

src/corral/ui/static/vendor/xterm.js src/corral/ui/static/vendor/uplot.js &: frontend/package-lock.json frontend/copy-vendor.mjs
	cd frontend && npm ci --no-audit --no-fund --loglevel=error
	node frontend/copy-vendor.mjs

system:
	@bash scripts/install-system-deps.sh

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

run: setup
	@bash scripts/run-demo.sh

# A three-host pool on this machine (hosts are network namespaces) under $CORRAL_HOME/cluster-demo; prints the
# `export CORRAL_...` lines for the CLI: eval "$(make -s cluster-demo)". cluster-down removes all of it.
cluster-demo: setup
	@$(BIN)/python -m corral.localpool up

cluster-down:
	@if [ -x $(BIN)/python ]; then $(BIN)/python -m corral.localpool down; fi

test: setup
	$(BIN)/pytest -q --durations=20

test-unit: setup
	$(BIN)/pytest -q tests/unit

# Style, the layers of docs/architecture.md (import-linter contracts in pyproject.toml) and types (mypy).
# It needs the Python tools (and python3-venv), not the web console's files.
lint: system $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/lint-imports
	$(BIN)/mypy

bench: setup
	$(BIN)/python benchmarks/boot.py

clean:
	rm -rf $(VENV) build *.egg-info
