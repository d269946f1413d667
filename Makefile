# voxelflow: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIPFLAGS ?= -q
# Test processes: one per core (pytest-xdist); whole modules stay on one process so
# their module fixtures are built once.
TEST_WORKERS ?= auto

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
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=25

clean:
	rm -rf demo_workspace .pytest_cache
