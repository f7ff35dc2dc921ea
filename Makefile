# One command each, from a fresh clone:  make demo  |  make test
PYTHON ?= python3

.PHONY: install demo test bench

install:
	$(PYTHON) -m pip install --disable-pip-version-check -e ".[dev]"

demo: install
	$(PYTHON) -m edgezo.cli demo

test: install
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/mezo_step.py
