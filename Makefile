# Two commands on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTHON ?= python3

.PHONY: run test lint typecheck unit bench clean system-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/streamvec up --demo

lint: $(STAMP)
	$(VENV)/bin/ruff check streams tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

unit: $(STAMP)
	$(PY) -m pytest -q

# redis-cli (Debian's redis-tools) drives the RESP server in the tests, as a user would.
system-deps:
	@command -v redis-cli >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-tools >/dev/null; \
	  else echo "redis-cli not found: install redis-tools (its tests are skipped without it)"; fi; }

test: system-deps lint typecheck unit

bench: $(STAMP)
	$(PY) bench/log_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
