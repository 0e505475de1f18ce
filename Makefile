# Set-up and entry points. `make test` is what CI runs (.ci/run) on a clean checkout.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.jax_cache

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
