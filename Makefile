# Every target does its own set-up: on a fresh clone `make demo` and `make test` create the
# virtual environment and install the pinned stack (constraints.txt) before they run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test demo bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

test: install
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the lab's quick mode: every experiment, 3 seeds, a few minutes; report in lab-report/
demo: install
	$(VENV)/bin/normkit lab --quick

bench: install
	$(VENV)/bin/normkit bench

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
