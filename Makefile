# Set-up and entry points. `make test` is what CI runs (.ci/run) on a clean checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache
# The shared data (XSTest's human-labelled completions) beside this checkout or, for a clone elsewhere, the team's.
export SAFEWORK_SHARED_DATA ?= $(firstword $(wildcard $(CURDIR)/../shared/data /work/shared/data))

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate requirements.txt setup.py
	$(BIN)/pip install -q -r requirements.txt
	$(BIN)/pip install -q --no-deps -e .
	touch $@

.PHONY: install test safeladder
install: $(VENV)/.installed

WORKDIR ?= workdir/safeladder
safeladder: $(VENV)/.installed
	$(BIN)/python -m safework.main --config experiments/tiny_safeladder.py --workdir $(WORKDIR)

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q -n 2 tests
