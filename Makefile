# Fresh machine: Python 3.11, pip and gcc are enough.  Every target creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the built-in dataset (simulated from PDB 8ZPM), end to end.
demo: $(STAMP)
	$(BIN)/cistem-mpi demo --directory demo_project --ranks 3 --force

# The default test suite (< 15 min on 2 cores).  Slow acceptance tests: make test-slow.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf demo_project demo_project-data .pytest_cache
