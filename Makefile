# The two commands of the README: `make demo` and `make test`. Everything they
# need is installed here, into .venv, from the project's own pyproject.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
DEMO_HOME := $(CURDIR)/.kmsguard

.PHONY: demo test lint bench clean

# The hot path is compiled in place (setup.py): a changed source must rebuild it, or
# Python would keep importing the stale extension next to it.
COMPILED_SOURCES := setup.py $(wildcard src/kmsguard/*.pxd src/kmsguard/*/*.pxd) $(patsubst %.pxd,%.py,$(wildcard src/kmsguard/*.pxd src/kmsguard/*/*.pxd)) src/kmsguard/nonces.py

$(VENV)/.installed: pyproject.toml $(COMPILED_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# Benchmarks compare against other libraries (Powertools' DataMasking), installed only here.
$(VENV)/.installed-bench: $(VENV)/.installed-test pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,bench]'
	touch $@

demo: $(VENV)/.installed
	KMSGUARD_HOME=$(DEMO_HOME) $(PY) scripts/demo.py

lint: $(VENV)/.installed-test
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/mypy

test: lint
	$(BIN)/pytest

bench: $(VENV)/.installed-bench
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(DEMO_HOME) build .pytest_cache .mypy_cache .ruff_cache src/kmsguard/*.so src/kmsguard/*.c
