# workerlease: the commands a newcomer needs.
#   make run    serve on SQLite with local pools (infra/local.yaml), printing how to start
#   make stop   after Ctrl-C: destroy the workers make run left (local agents keep running)
#   make test   install everything the tests need (venv, Docker engine, PostgreSQL binaries,
#               test image) and run the whole suite (on TEST_JOBS=2 processes)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8080
CONFIG ?= infra/local.yaml
ADMIN_TOKEN_FILE ?= var/admin-token
PYTEST_ARGS ?=

.PHONY: install checkov run tenant stop test test-crash-full test-quick lint typecheck check bench system-deps \
        docker-engine postgres nginx promtool chromium images clean

# The tenant's client (client/) too, editable in compat mode: a path in a .pth file,
# which mypy follows (it cannot follow the default mode's import hook).
$(VENV)/.installed: pyproject.toml client/pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev,docker,aws,postgres]'
	$(PY) -m pip install -q -e ./client --config-settings editable_mode=compat
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
	@test -s $(ADMIN_TOKEN_FILE) || (umask 077; $(PY) -c 'import secrets; print(secrets.token_urlsafe(32))' > $(ADMIN_TOKEN_FILE))
	@chmod 600 $(ADMIN_TOKEN_FILE)
	@echo "workerlease: http://127.0.0.1:$(PORT)  (SQLite var/workerlease.db, local pools from $(CONFIG))"
	@echo "Admin token: $(ADMIN_TOKEN_FILE). Create a tenant in another terminal with:"
	@echo "  make tenant NAME=acme$(if $(filter-out 8080,$(PORT)), PORT=$(PORT))"
	@echo "or: curl -s -X POST -H \"Authorization: Bearer \$$(cat $(ADMIN_TOKEN_FILE))\" -H 'Content-Type: application/json' \\"
	@echo "       -d '{\"name\": \"acme\"}' http://127.0.0.1:$(PORT)/v1/admin/tenants"
	@echo "Dashboard: http://127.0.0.1:$(PORT)/admin/ (sign in with the admin token)"
	@echo "API docs: http://127.0.0.1:$(PORT)/docs/   Stop with Ctrl-C, then 'make stop' to remove the workers."
	WORKERLEASE_ADMIN_TOKEN=$$(cat $(ADMIN_TOKEN_FILE)) $(VENV)/bin/workerlease serve \
	    --config $(CONFIG) --port $(PORT)

# Fails (exit 1, the reason on stderr) when the service does not answer or refuses.
tenant:
	@test -s $(ADMIN_TOKEN_FILE) || { echo "make tenant: no $(ADMIN_TOKEN_FILE); start the service with 'make run' first" >&2; exit 1; }
	@curl -sS --fail-with-body -X POST -H "Authorization: Bearer $$(cat $(ADMIN_TOKEN_FILE))" \
	    -H 'Content-Type: application/json' -d '{"name": "$(or $(NAME),acme)"}' \
	    http://127.0.0.1:$(PORT)/v1/admin/tenants \
	  || { echo; echo "make tenant: could not create the tenant at http://127.0.0.1:$(PORT) (is 'make run PORT=$(PORT)' running?)" >&2; exit 1; }
	@echo

# After make run stopped: local agents outlive the service (a restart finds them again);
# this destroys them and marks them destroyed. Refuses while the service still runs.
stop:
	@test -x $(VENV)/bin/workerlease || { echo "make stop: no $(VENV); nothing was run from here" >&2; exit 1; }
	$(VENV)/bin/workerlease cleanup --config $(CONFIG)

# Engines and servers the integration tests run against (root on Debian-like machines).
docker-engine:
	bash .ci/ensure-docker

postgres:
	bash .ci/ensure-postgres

nginx:
	bash .ci/ensure-nginx

# promtool checks the alert rules; chromium drives the dashboard's browser tests.
promtool:
	bash .ci/ensure-promtool

chromium:
	bash .ci/ensure-chromium

images: install docker-engine
	$(PY) -m images.build testing

system-deps: docker-engine postgres nginx promtool chromium

# The suite on TEST_JOBS processes (pytest-xdist). A test file stays on one process, so
# a module's server or browser starts once; files go out in the order tests/conftest.py
# gives them, the long integration files first (xdist's default sends the files with
# the most tests first, which left the one-test replica run of the crash suite for last),
# and tests/conftest.py prints the crash suite's line from every process's counts. Most
# tests wait on servers, agents and engines, so two processes on two cores overlap those.
TEST_JOBS ?= 2
test: install checkov system-deps images
	WORKERLEASE_CHECKOV=$(CURDIR)/$(CHECKOV_VENV)/bin/checkov $(PY) -m pytest \
	    -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The crash suite in full: 52 SIGKILL runs, and two replicas taking up to 100,000 lease
# attempts for up to 1,000 s (make test runs its quick mode). Needs what make test needs;
# about 35 minutes here.
test-crash-full: install system-deps images
	WORKERLEASE_CRASH_FULL=1 $(PY) -m pytest tests/integration/crash $(PYTEST_ARGS)

# Unit and API tests only: no Docker, PostgreSQL or moto needed.
test-quick: install
	$(PY) -m pytest tests/unit tests/api -m 'not postgres' $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check service provisioners images tests client
	$(VENV)/bin/ruff format --check service provisioners images tests client

typecheck: install
	$(VENV)/bin/mypy service provisioners images
	cd client && $(abspath $(VENV))/bin/mypy --strict workerlease_client

check: lint typecheck test

bench: install
	$(PY) -m tests.benchmarks.run

clean:
	rm -rf $(VENV) $(CHECKOV_VENV) var .pytest_cache .mypy_cache .ruff_cache
