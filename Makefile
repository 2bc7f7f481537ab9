# workerlease: the commands a newcomer needs.
#   make run    serve on SQLite with local pools (infra/local.yaml), printing how to start
#   make test   install everything the tests need (venv, Docker engine, PostgreSQL binaries,
#               test image) and run the whole suite
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
PYTEST_ARGS ?=

.PHONY: install checkov run tenant test test-crash-full test-quick lint typecheck check bench system-deps \
        docker-engine postgres nginx images clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,docker,aws,postgres]'
	touch $@

install: $(VENV)/.installed

# checkov pins old boto3/packaging; it gets a virtualenv of its own.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/.installed:
	python3 -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q 'checkov>=3,<4'
	touch $@

checkov: $(CHECKOV_VENV)/.installed

run: install
	@mkdir -p var && chmod 700 var
	@test -s var/admin-token || (umask 077; $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > var/admin-token)
	@chmod 600 var/admin-token
	@echo "workerlease: http://127.0.0.1:$(PORT)  (SQLite var/workerlease.db, local pools from infra/local.yaml)"
	@echo "Admin token: var/admin-token. Create a tenant in another terminal with:"
	@echo "  make tenant NAME=acme"
	@echo "or: curl -s -X POST -H \"Authorization: Bearer \$$(cat var/admin-token)\" -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"name\": \"acme\"}' http://127.0.0.1:$(PORT)/v1/admin/tenants"
	@echo "API docs: http://127.0.0.1:$(PORT)/docs/   Stop with Ctrl-C."
	WORKERLEASE_ADMIN_TOKEN=$$(cat var/admin-token) $(VENV)/bin/workerlease serve \
	    --config infra/local.yaml --port $(PORT)

tenant: install
	@test -s var/admin-token || { echo "start the service with 'make run' first"; exit 1; }
	@curl -sf -X POST -H "Authorization: Bearer $$(cat var/admin-token)" \
	    -H 'Content-Type: application/json' -d '{"name": "$(or $(NAME),acme)"}' \
	    http://127.0.0.1:$(PORT)/v1/admin/tenants; echo

# Engines and servers the integration tests run against (root on Debian-like machines).
docker-engine:
	bash .ci/ensure-docker

postgres:
	bash .ci/ensure-postgres

nginx:
	bash .ci/ensure-nginx

images: install docker-engine
	$(PY) -m images.build testing

system-deps: docker-engine postgres nginx

test: install checkov system-deps images
	WORKERLEASE_CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest $(PYTEST_ARGS)

# The crash suite in full: 52 SIGKILL runs and 4000 lease/release cycles (make test runs
# its quick mode). Needs what make test needs; takes several minutes more.
test-crash-full: install system-deps images
	WORKERLEASE_CRASH_FULL=1 $(PY) -m pytest tests/integration/crash $(PYTEST_ARGS)

# Unit and API tests only: no Docker, PostgreSQL or moto needed.
test-quick: install
	$(PY) -m pytest tests/unit tests/api -m 'not postgres' $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service provisioners images tests
	$(VENV)/bin/ruff format --check service provisioners images tests

typecheck: install
	$(VENV)/bin/mypy service provisioners images

check: lint typecheck test

bench: install
	$(PY) -m tests.benchmarks.run

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) var .pytest_cache .mypy_cache .ruff_cache
