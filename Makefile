# Two entry points (see README): `make demo` and `make test`.
# Both create or reuse the virtualenv in $(VENV) and build the Rust extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed

.PHONY: demo test build pytest cargo-test bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q maturin
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

# Rebuild the extension in place (cargo is incremental, so this is quick when nothing changed).
build: $(STAMP)
	$(VENV)/bin/maturin develop --release -q

demo: build
	$(PY) -m keras_ee train --out runs/demo

cargo-test:
	cargo test --release -q

# pytest-xdist: one worker per core (two on the 2-core machine); most of a test's time is single-threaded
# Python (tracing). worksteal hands each worker a contiguous half of the tests, so a module's tests (and
# its module fixtures: trained runs) mostly stay on one worker, and an idle worker takes over the rest.
PYTEST_ARGS ?= -n auto --dist worksteal

pytest: build
	$(PY) -m pytest -q $(PYTEST_ARGS)

test: build cargo-test
	$(PY) -m pytest -q $(PYTEST_ARGS)

clean:
	rm -rf target $(VENV) keras_ee/_native*.so
