# The two commands: `make demo` and `make test`. Each builds .venv from nothing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
CONSTRAINTS := ci/constraints.txt
DEMO_OUT ?= out/demo

.PHONY: demo test lint bench clean venv-demo venv-test

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.demo-installed: $(PY) pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[torch]"
	touch $@

$(VENV)/.test-installed: $(PY) pyproject.toml $(CONSTRAINTS)
	$(PIP) install --quiet -c $(CONSTRAINTS) -e ".[all]"
	touch $@ $(VENV)/.demo-installed

venv-demo: $(VENV)/.demo-installed
venv-test: $(VENV)/.test-installed

demo: venv-demo
	$(VENV)/bin/gsnr-stats demo -o $(DEMO_OUT)

lint: venv-test
	$(VENV)/bin/ruff check gsnr_stats adapters tests bench examples

test: venv-test lint
	$(PY) -m pytest -q -n logical --dist worksteal --durations=15

bench: venv-test
	$(PY) bench/reduce.py
	$(PY) bench/adapters.py
	$(PY) bench/scale.py
	$(PY) bench/records.py
	$(PY) bench/checksum.py

clean:
	rm -rf $(VENV) out build *.egg-info
