# meterproxy — every target sets up what it needs on a fresh Debian/Ubuntu machine with Python 3.11+.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_PKGS := redis-server prometheus postgresql
PORT     ?= 8080
SIM_PORT ?= 9000

.PHONY: install demo demo-ports test lint bench system-deps clean lock

# Installs come from the lock files in requirements/ (every package pinned and hashed, PyPI only,
# Python 3.11 on Linux): runtime.lock the package's dependencies, demo.lock those plus the demo
# extra (openai), dev.lock those plus the dev extra. The ranges stay in pyproject.toml; after
# changing them, `make lock` brings the locks up to date (keeping every pin it can).
# Development venv: the package plus the dev extras (tests, linters, profiler).
$(STAMP): pyproject.toml requirements/dev.lock
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes -r requirements/dev.lock
	$(BIN)/pip install -q --no-deps -e .
	touch $(STAMP)

# `make install`: the venv with the runtime package only (no dev extras, nothing from apt).
# `make demo` adds the openai SDK its banner's snippet uses. A dev venv already has both.
$(VENV)/.runtime $(VENV)/.demo: $(VENV)/.%: pyproject.toml requirements/%.lock
	@if [ -f $(STAMP) ] && [ $(STAMP) -nt pyproject.toml ] && [ $(STAMP) -nt requirements/$*.lock ]; then \
	  touch $@; else \
	  $(PY) -m venv $(VENV) && $(BIN)/pip install -q --require-hashes -r requirements/$*.lock && \
	  $(BIN)/pip install -q --no-deps -e . && touch $@; fi

install: $(VENV)/.runtime
	@echo "installed: . $(BIN)/activate  (or run $(BIN)/meterproxy)"

# pip-compile in a throwaway venv, from PyPI alone: the local pip configuration (find-links, extra
# indexes, constraints) is ignored, so the locks hold only what CI, which reaches PyPI alone, can
# install. Hashes cover every file of a pinned release (all platforms).
PIP_TOOLS := pip-tools==7.6.2
PIP_COMPILE = env -u PIP_FIND_LINKS -u PIP_INDEX_URL -u PIP_EXTRA_INDEX_URL -u PIP_CONSTRAINT \
	PIP_CONFIG_FILE=/dev/null CUSTOM_COMPILE_COMMAND="make lock" "$$tmp/bin/pip-compile" -q \
	--generate-hashes --allow-unsafe --strip-extras --no-emit-find-links \
	--index-url https://pypi.org/simple --pip-args --isolated pyproject.toml
lock:
	@$(PY) -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11) and "make lock: the locks are for Python 3.11; run make lock PY=python3.11")'
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && set -e && \
	$(PY) -m venv "$$tmp" && "$$tmp/bin/pip" install -q '$(PIP_TOOLS)' && \
	$(PIP_COMPILE) -o requirements/runtime.lock && \
	$(PIP_COMPILE) --extra demo -o requirements/demo.lock && \
	$(PIP_COMPILE) --extra dev --extra demo -o requirements/dev.lock

# redis-server (tests, demo), prometheus/promtool (monitoring tests) and PostgreSQL (ledger tests:
# the suite runs initdb/pg_ctl itself, on an ephemeral port) from Debian's packages.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi

lint: $(STAMP)
	$(BIN)/ruff check meterproxy tests bench
	$(BIN)/mypy meterproxy

test: $(STAMP) system-deps lint
	$(BIN)/pytest -q -p no:cacheprovider

# The demo uses the in-process limiter and the simulator: no Redis, no Prometheus, no apt.
# Ports are checked first (stdlib only), so a taken port fails before anything is installed.
demo: demo-ports $(VENV)/.demo
	@$(BIN)/python scripts/demo.py --port $(PORT) --sim-port $(SIM_PORT)

demo-ports:
	@$(PY) scripts/demo.py --check-ports --port $(PORT) --sim-port $(SIM_PORT)

# issue #6: nginx (the forwarding floor), wrk (load), redis-server (store) and taskset from Debian's
# packages; py-spy comes with the dev extras. Writes bench/results/ and docs/performance.md.
bench: $(STAMP)
	@missing=""; \
	command -v wrk >/dev/null || missing="$$missing wrk"; \
	{ command -v nginx >/dev/null || [ -x /usr/sbin/nginx ]; } || missing="$$missing nginx"; \
	command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	command -v taskset >/dev/null || missing="$$missing util-linux"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing; \
	fi
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
