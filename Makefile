# One command per habit. `make demo` and `make test` work on a fresh clone: each sets up
# .venv first from this repo's own files (pyproject.toml, package-lock.json). `demo` needs
# only the light set (CDK for the synth, moto, numpy): no PyTorch download for a newcomer.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
export CDK_DISABLE_VERSION_CHECK := 1
export JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION := 20
export JSII_SILENCE_WARNING_UNTESTED_NODE_VERSION := 1
export MOTO_EC2_LOAD_DEFAULT_AMIS := false

.PHONY: setup setup-demo demo test test-fast lint format synth bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml package.json package-lock.json
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned (a CPU build); an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet -e '.[dev,infra,train,integrations]'
	npm ci --no-audit --no-fund --loglevel=error
	touch $(STAMP) $(DEMO_STAMP)

# The full set-up includes everything the demo needs, so after `make setup` this is a no-op.
setup-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[infra,rehearse]'
	touch $(DEMO_STAMP)

# The bundled numpy example (tiny_train); `trainctl rehearse train` runs the PyTorch one.
demo: setup-demo
	$(BIN)/trainctl rehearse --interruptions 2 --no-notice 1

test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy layers/core/python/trainctl_core functions infra training/trainctl

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

synth: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" npx --no-install cdk synth --quiet

bench: setup
	$(BIN)/python -m bench.run_all

clean:
	rm -rf $(VENV) node_modules cdk.out .pytest_cache .mypy_cache .ruff_cache
