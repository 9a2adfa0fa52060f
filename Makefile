# magasin — the entry points are `make run`, `make cluster` and `make test`; each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONSOLE := src/magasin/console
CONSOLE_STAMP := $(CONSOLE)/node_modules/.installed

.PHONY: run cluster test lint typecheck bench clean install

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The console's front-end libraries, from npm (package-lock.json), served by magasin itself.
$(CONSOLE_STAMP): $(CONSOLE)/package.json $(CONSOLE)/package-lock.json
	bash scripts/ensure-console-libraries.sh

install: $(STAMP) $(CONSOLE_STAMP)

run: $(STAMP) $(CONSOLE_STAMP)
	$(VENV)/bin/magasin up

# Distributed mode on this machine: PostgreSQL, RabbitMQ, every service and the gateway on
# http://127.0.0.1:8080 (ARGS="--scale transaction=2,inventory=2" for more processes).
cluster: $(STAMP) $(CONSOLE_STAMP)
	bash scripts/ensure-services.sh
	bash scripts/ensure-gateway.sh
	$(VENV)/bin/magasin cluster up $(ARGS)

test: $(STAMP) $(CONSOLE_STAMP)
	bash scripts/ensure-services.sh
	bash scripts/ensure-observability-tools.sh
	bash scripts/ensure-gateway.sh
	bash scripts/ensure-browser.sh
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

typecheck: $(STAMP)
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) bench/eventstore.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache $(CONSOLE)/node_modules test-artifacts
