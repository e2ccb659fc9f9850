# The two commands of the README: `make demo` and `make test`. Everything they
# need is installed here, into .venv, from the project's own pyproject.
# `make docs` serves the documentation site (docs/, mkdocs.yml) on 127.0.0.1:8000.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
BIN    := $(VENV)/bin
DEMO_HOME := $(CURDIR)/.kmsguard
SITE   := site
# The supported versions (pyproject's classifiers): noxfile.py has a session for each.
PYTHON_VERSIONS := 3.11 3.12 3.13

# Each version's whole suite, and the whole suite once more on 3.11 with the hot path as
# plain Python (test-pure).
TEST_SESSIONS := $(addprefix test-,$(PYTHON_VERSIONS)) test-pure

.PHONY: demo test lint docs docs-build bench clean prometheus-tools $(TEST_SESSIONS)

# The hot path is compiled in place (setup.py): a changed source must rebuild it, or
# Python would keep importing the stale extension next to it.
COMPILED_SOURCES := setup.py $(wildcard src/kmsguard/*.pxd src/kmsguard/*/*.pxd) $(wildcard $(patsubst %.pxd,%.py,$(wildcard src/kmsguard/*.pxd src/kmsguard/*/*.pxd)))

$(VENV)/.installed: pyproject.toml $(COMPILED_SOURCES)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[server]'
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(PY) -m pip install --quiet -e '.[test,docs,server]'
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

# A broken link, a missing page or a bad include fails the build (--strict).
docs-build: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir $(SITE)

docs: $(VENV)/.installed-test
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve

# Lint, type checks and the docs build once; the whole suite on every supported Python
# the machine has (noxfile.py), and once more on 3.11's plain-Python build (KMSGUARD_PURE=1),
# all in parallel. -O prints each session's output whole when it ends; nox names a version
# the machine lacks as skipped. KMSGUARD_NOX_RUN lets the sessions share one sdist and one
# wheel per interpreter (test-3.11 and test-pure install the same one).
test: lint docs-build prometheus-tools
	KMSGUARD_NOX_RUN=$$(date +%s%N) $(MAKE) --no-print-directory -O -j$(words $(TEST_SESSIONS)) $(TEST_SESSIONS)

test-pure: $(VENV)/.installed-test
	$(BIN)/nox --session tests-pure

# One version: `make test-3.12`, or pytest options through nox, e.g.
# `.venv/bin/nox -s tests-3.12 -- tests/audit -x`.
$(addprefix test-,$(PYTHON_VERSIONS)): test-%: $(VENV)/.installed-test
	$(BIN)/nox --session tests-$*

# promtool and prometheus (Debian's prometheus package): the monitoring tests check the generated rules
# and scrape a real service with them (tests/monitoring), and fail saying so when they are missing.
prometheus-tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus)

# wrk (a compiled HTTP load generator) drives `python -m bench server`.
bench: $(VENV)/.installed-bench
	command -v wrk >/dev/null || (apt-get update -qq && apt-get install -y -qq wrk)
	$(PY) -m bench

# Every build output: the venv, setuptools' build/dist/egg-info, and the Cython output
# (.c and the extension next to each compiled module, in every subpackage; .gitignore
# holds that no .c under src/ is hand-written).
clean:
	rm -rf $(VENV) .nox $(DEMO_HOME) $(SITE) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
	find src \( -name '*.c' -o -name '*.so' -o -name '*.pyd' \) -type f -delete
	find src tests bench scripts -name __pycache__ -type d -prune -exec rm -rf {} +
