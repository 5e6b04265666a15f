# Two entry points (see README): `make demo` and `make test`; `make lint` and `make docs` are CI's gates.
# Both create or reuse the virtualenv in $(VENV) and build the Rust extension.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deps-installed
# The extras of pyproject.toml that $(STAMP) installs (a variable: a comma inside $(call ...) would split its arguments).
EXTRAS := test,docs
# Set-up steps print one line each; their pip / maturin output goes here, shown only on failure.
SETUP_LOG := .setup.log

# $(call step,what it does,command): one line, and the last of the log if the command fails.
define step
	@printf '%s\n' "$(1)"
	@$(2) > $(SETUP_LOG) 2>&1 || { tail -n 40 $(SETUP_LOG); echo "$(1): failed (full log: $(SETUP_LOG))"; exit 1; }
endef

.PHONY: demo test build pytest cargo-test lint docs bench clean

$(STAMP): pyproject.toml
	$(call step,setup: virtualenv in $(VENV),test -x $(PY) || $(PYTHON) -m venv $(VENV))
	$(call step,setup: pip and maturin,$(PY) -m pip install --upgrade pip maturin)
	$(call step,setup: keras-ee and its test and docs dependencies (a few minutes the first time),$(PY) -m pip install -e '.[$(EXTRAS)]')
	@touch $(STAMP)

# Rebuild the extension in place (cargo is incremental, so this is quick when nothing changed);
# the dependencies are installed above, so maturin only builds.
build: $(STAMP)
	$(call step,setup: the Rust extension (maturin develop --release),$(VENV)/bin/maturin develop --release --skip-install)

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

# cargo test runs beside pytest (its compile and run take ~20 s of one core on a fresh clone); a
# failure of either fails the target.
test: build
	@cargo test --release -q > .cargo-test.log 2>&1 & cargo=$$!; \
	$(PY) -m pytest -q $(PYTEST_ARGS); pytest=$$?; \
	wait $$cargo; cargo_rc=$$?; cat .cargo-test.log; \
	if [ $$cargo_rc -ne 0 ]; then echo "make test: cargo test failed"; fi; \
	[ $$pytest -eq 0 ] && [ $$cargo_rc -eq 0 ]

# The gates every change passes: Python lint and format, Rust format and clippy, the types of
# keras_ee, and the .pyi stub of the Rust module against the compiled module.
lint: build
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cargo fmt --check
	cargo clippy --all-targets --all-features -q -- -D warnings
	$(VENV)/bin/mypy keras_ee
	$(PY) -m mypy.stubtest keras_ee._native

# The documentation site (mkdocs.yml) into site/, in strict mode: a broken link, a missing reference or
# a docstring warning fails it. The API reference is generated from the package tree
# (docs/gen/ref_pages.py) and read from the source, so neither TensorFlow nor the Rust extension is needed.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 DISABLE_MKDOCS_2_WARNING=true $(VENV)/bin/mkdocs build --strict

clean:
	rm -rf site target $(VENV) $(SETUP_LOG) .cargo-test.log keras_ee/_native*.so
