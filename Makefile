# voxelflow: `make demo` and `make test` are all the set-up a fresh machine needs.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIPFLAGS ?= -q

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
	$(PY) -m pytest -q

clean:
	rm -rf demo_workspace .pytest_cache
