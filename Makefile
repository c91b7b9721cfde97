# Two entry points, both safe to run on a fresh clone:
#   make repro   create .venv, install the package, run the DVC pipeline
#   make test    create .venv, install the package with test extras, run pytest
# The README explains each step; .ci/run calls `make test`.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and on its own: a bare `torch` requirement can pull
# a multi-GB CUDA build on machines that only need the CPU. Override for a
# specific build, e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu126".
TORCH_SPEC ?= torch==2.13.0

.PHONY: install install-dev browser repro test bench clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e .

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[dev]'

# Browser tests drive Debian's Chromium; without it they are skipped with a reason.
browser:
	@if command -v chromium >/dev/null 2>&1; then \
		echo "chromium: $$(command -v chromium)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core; \
	else \
		echo "chromium not found and not root: browser tests will be skipped (install Debian's chromium package to run them)"; \
	fi

repro: install
	. $(BIN)/activate && dvc repro

# Each test file runs in a pytest process of its own. In one process for the
# whole suite the interpreter crashed with a segmentation fault late in the
# run (cause not yet found; every file passes on its own). Exit status 5
# means a file had no selected tests, e.g. only `extended` ones.
test: install-dev browser
	@failed=""; for file in tests/test_*.py; do \
		$(BIN)/python -m pytest -p no:cacheprovider "$$file"; status=$$?; \
		if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then failed="$$failed $$file"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "failed test files:$$failed"; exit 1; fi; \
	echo "all test files passed"

bench: install-dev
	for script in benchmarks/bench_*.py; do $(BIN)/python $$script || exit 1; done

clean-venv:
	rm -rf $(VENV)
