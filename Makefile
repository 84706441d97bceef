# CSX developer entry points. Two commands from a fresh clone: `make run` (the stack) and
# `make test` (the suite). Everything depends on `gen`: generated code is not committed.
#
# uv: taken from PATH if there, otherwise installed once into .tools (python3 -m venv + pip).

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help
.DELETE_ON_ERROR:

UV ?= $(shell command -v uv 2>/dev/null || echo .tools/bin/uv)
PYTHON3 ?= python3
VENV := .venv
PY := $(VENV)/bin/python
SERVICES := referrals panel conferences actionplans
# --frozen: install exactly uv.lock (plain `uv sync` only while there is no lock yet).
SYNC_FLAGS := $(if $(wildcard uv.lock),--frozen,)

PROTOS := $(shell find protos -name '*.proto' 2>/dev/null)
# Written last by tools/gen_protos.py, so it stands for "generated code is up to date".
GENERATED := libs/contracts/src/csx/py.typed

# uv trusts only its built-in roots unless told; where the system CA bundle exists, use it (it holds
# any site CA that a proxy in front of the package index presents).
SYSTEM_CA := /etc/ssl/certs/ca-certificates.crt
ifeq ($(SSL_CERT_FILE),)
ifneq ($(wildcard $(SYSTEM_CA)),)
export SSL_CERT_FILE := $(SYSTEM_CA)
endif
endif

# Extra arguments: make test PYTEST_ARGS='-k journey -x'; make run RUN_ARGS='--base-port 60051'
PYTEST_ARGS ?=
RUN_ARGS ?=

.PHONY: help bootstrap gen run test lint ruff mypy buf migrations-check imports bench chaos soak clean distclean

help:
	@echo "make bootstrap  install uv if missing, create .venv from uv.lock"
	@echo "make gen        generate Python from protos/ (libs/contracts/src)"
	@echo "make run        start NATS + the four services (csx up; Ctrl-C stops)"
	@echo "make test       run the test suite (tests/)"
	@echo "make lint       ruff, mypy (strict on libs/), buf lint, alembic checks, import boundaries"
	@echo "make bench      run benchmarks/run.py"
	@echo "make chaos      the long fault run: 10,000 concerns, random seed (CHAOS_ARGS='--seed N --backend postgres')"
	@echo "make soak       10 minutes at a steady rate: throughput, latency, memory (SOAK_ARGS='--minutes 30')"
	@echo "make clean      remove generated code and build output (distclean: also .venv, .tools, var)"

# Only when uv is not on PATH: a private venv holding uv.
.tools/bin/uv:
	$(PYTHON3) -m venv .tools
	.tools/bin/pip install --quiet --disable-pip-version-check uv

bootstrap: $(if $(filter .tools/bin/uv,$(UV)),.tools/bin/uv)
	$(UV) sync $(SYNC_FLAGS)

# After generating, reinstall csx-contracts: its editable install, built by `uv sync` on a fresh
# clone before src/csx existed, has no path entry for the generated packages (hatchling leaves
# out directories that are missing at build time), so `import csx` would fail.
define generate
	$(PY) tools/gen_protos.py
	$(UV) sync $(SYNC_FLAGS) --reinstall-package csx-contracts --quiet
	$(PY) -c "import csx.referrals.v1.referrals_pb2, buf.validate.validate_pb2"
endef

$(GENERATED): $(PROTOS) tools/gen_protos.py | bootstrap
	$(generate)

gen: bootstrap
	$(generate)

run: bootstrap $(GENERATED)
	$(VENV)/bin/csx up $(RUN_ARGS)

test: bootstrap $(GENERATED)
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

lint: ruff mypy buf migrations-check imports

ruff: bootstrap
	$(VENV)/bin/ruff check .

# Strict on the libraries every service builds on ([tool.mypy] in pyproject.toml).
mypy: bootstrap $(GENERATED)
	$(VENV)/bin/mypy

buf: bootstrap $(GENERATED)
	$(VENV)/bin/buf lint build/image.binpb --path csx --config protos/buf.yaml

# Each service's migrations (its own branch over the kernel's), upgraded on a scratch SQLite file,
# must match its tables; each kernel branch alone must match its table factory (docs/adr/0010).
migrations-check: bootstrap $(GENERATED)
	@mkdir -p build
	@for svc in $(SERVICES); do \
	  echo "alembic check: $$svc"; \
	  rm -f build/alembic-$$svc.db; \
	  $(PY) tools/migrations.py $$svc check || exit 1; \
	done
	@$(PY) tools/migrations.py kernel check

imports: bootstrap
	$(PY) tools/check_imports.py

bench: bootstrap $(GENERATED)
	@if [ ! -f benchmarks/run.py ]; then echo "benchmarks/run.py does not exist yet" >&2; exit 1; fi
	$(PY) benchmarks/run.py

CHAOS_ARGS ?=
SOAK_ARGS ?=

chaos: bootstrap $(GENERATED)
	$(PY) -m tests.chaos.run chaos --concerns 10000 --rate 25 $(CHAOS_ARGS)

soak: bootstrap $(GENERATED)
	$(PY) -m tests.chaos.run soak --minutes 10 --rate 20 $(SOAK_ARGS)

clean:
	rm -rf build libs/contracts/src/csx libs/contracts/src/buf .pytest_cache .ruff_cache .hypothesis
	find . -name __pycache__ -type d -not -path './.venv/*' -not -path './.tools/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf .venv .tools var
