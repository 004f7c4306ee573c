# meterproxy — every target sets up what it needs on a fresh Debian/Ubuntu machine with Python 3.11+.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
APT_PKGS := redis-server prometheus postgresql
PORT     ?= 8080
SIM_PORT ?= 9000

.PHONY: install demo demo-ports test lint bench system-deps clean

# Development venv: the package plus the dev extras (tests, linters, profiler).
$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

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
