# magasin — the entry points are `make run`, `make cluster` and `make test`; each installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run cluster test lint typecheck bench clean install

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/magasin up

# Distributed mode on this machine: PostgreSQL, RabbitMQ, every service and the gateway on
# http://127.0.0.1:8080 (ARGS="--scale transaction=2,inventory=2" for more processes).
cluster: $(STAMP)
	bash scripts/ensure-services.sh
	bash scripts/ensure-gateway.sh
	$(VENV)/bin/magasin cluster up $(ARGS)

test: $(STAMP)
	bash scripts/ensure-services.sh
	bash scripts/ensure-observability-tools.sh
	bash scripts/ensure-gateway.sh
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
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
