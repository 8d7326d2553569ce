# The two commands a new user needs (see README):
#   make demo   set up on a fresh machine and run the whole pipeline on the embedded world
#   make test   set up on a fresh machine and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test test-fast lint

setup:
	bash scripts/setup.sh

# the demo needs no extras (tests, DeepSpeed, Ray): a shorter set-up; `make test` adds them later
demo:
	UNIFILTER_EXTRAS= bash scripts/setup.sh
	$(VENV)/bin/unifilter demo

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test:
	UNIFILTER_BROWSER=1 bash scripts/setup.sh
	$(PY) -m pytest -q

# the quick lane for development (CI runs everything with `make test`)
test-fast:
	bash scripts/setup.sh
	$(PY) -m pytest -q -m "not slow"
