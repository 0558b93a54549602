# The two commands of the README: `make demo` runs the main job, `make test` runs the tests.
# Each creates the virtual environment from scratch when it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mpc-fi-installed

.PHONY: demo test test-all bench venv clean

venv: $(STAMP)

# torch is pinned to the local CPU build; CrypTen goes in without its stale declared
# dependencies (see requirements/crypten.txt), then the project with its real ones.
$(STAMP): setup.cfg pyproject.toml requirements/crypten.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet --no-deps -r requirements/crypten.txt
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mpc-fi run

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ''

bench: $(STAMP)
	$(PY) benchmarks/report.py

clean:
	rm -rf $(VENV) runs .pytest_cache
