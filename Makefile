# Fresh machine: Python 3.11, pip and gcc are enough.  Every target creates .venv itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install demo test test-slow test-interop bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The whole pipeline on the built-in dataset: movies simulated from PDB 8ZPM -> cistem-mpi pipeline -> refined
# map, compared with the truth (add --compare for the chain from the true parameters beside it).
demo: $(STAMP)
	$(BIN)/cistem-mpi demo --directory demo_project --ranks 3 --force

# The default test suite (< 15 min on 2 cores).  Slow acceptance tests: make test-slow.
# Runs from a plain clone: the real files it reads are bundled in tests/data.
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not interop"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow and not interop"

# Interop tests: other programs' GPL or unclear-licence files, not in the repository, read
# from INTEROP_DATA (../shared/data beside the checkout; CISTEM_MPI_SHARED_DATA overrides).
# Without that directory they are not run (said so; not an error).
INTEROP_DATA ?= $(or $(CISTEM_MPI_SHARED_DATA),../shared/data)
test-interop: $(STAMP)
	@if [ ! -d "$(INTEROP_DATA)" ]; then \
	  echo "test-interop: NOT RUN: no data directory at $(abspath $(INTEROP_DATA))"; \
	  echo "test-interop: put the shared data there or set CISTEM_MPI_SHARED_DATA=/path/to/data"; \
	  exit 0; \
	fi; \
	echo "test-interop: reading $(abspath $(INTEROP_DATA))"; \
	rc=0; CISTEM_MPI_SHARED_DATA="$(abspath $(INTEROP_DATA))" $(BIN)/python -m pytest -q -m interop || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "test-interop: no interop tests collected"; rc=0; fi; \
	exit $$rc

bench: $(STAMP)
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf demo_project demo_project-data demo_project-truth .pytest_cache
