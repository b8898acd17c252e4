# The two commands of the quick start: `make demo` and `make test`.
# Each creates .venv, installs pagefork with its native extension, and runs.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SOURCES := pyproject.toml setup.py src/pagefork/_version.py $(wildcard src/pagefork/_native/*.[ch] src/pagefork/_baseline/*.c)
EXTRAS ?= test

.PHONY: demo test bench doctor clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Reinstalls (and so rebuilds the extension) whenever a native source changes.
$(STAMP): $(BIN)/python $(SOURCES)
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/pagefork demo

test: $(STAMP)
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[test,bench]"
	$(BIN)/pagefork bench --quick

doctor: $(STAMP)
	$(BIN)/pagefork doctor

clean:
	rm -rf $(VENV) build src/*.egg-info src/pagefork/*.so benchmarks/_build
