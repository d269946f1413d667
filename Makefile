# voxelflow: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIPFLAGS ?= -q
# Test processes: one per core (pytest-xdist); whole modules stay on one process so
# their module fixtures are built once. Each runs torch and BLAS on one thread: with a
# process per core, more threads only spin at OpenMP barriers (tests/stages/
# test_features.py on a loaded 2-core machine: 86 CPU s and 138 s wall with the
# default threads, 60 CPU s and 83 s with one). Every test, its CLI subprocesses and
# its cluster workers then run on the same thread count, so bitwise comparisons hold.
TEST_WORKERS ?= auto
TEST_THREADS ?= 1

.PHONY: demo test install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install $(PIPFLAGS) --upgrade pip

# Reinstall only when the project's dependency list changes.
$(VENV)/.installed-base: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIPFLAGS) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(PY)
	$(PY) -m pip install $(PIPFLAGS) -e '.[test]'
	touch $@ $(VENV)/.installed-base

install: $(VENV)/.installed-base

demo: $(VENV)/.installed-base
	$(VENV)/bin/voxelflow demo

test: $(VENV)/.installed-test
	OMP_NUM_THREADS=$(TEST_THREADS) MKL_NUM_THREADS=$(TEST_THREADS) \
	OPENBLAS_NUM_THREADS=$(TEST_THREADS) \
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf demo_workspace .pytest_cache
