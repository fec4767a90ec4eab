# The two commands a newcomer runs on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: demo test venv clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.13.0's CPU wheel is what this machine offers for the PyTorch reference.
	$(PY) -m pip install -q -e '.[test]' 'torch==2.13.0'
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) experiments/demo.py

test: venv
	$(PY) -m pytest -q -n 2 --durations=15 tests $(PYTEST_ARGS)

clean:
	rm -rf $(VENV)
