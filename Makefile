# One command each, from a fresh clone:  make demo  |  make test
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install install-torch demo test bench

install:        # the core: llama-cpp-python (builds from source, ~5 min the first time), gguf, numpy, tqdm; no torch
	$(PIP) install -e ".[dev]"

install-torch:  # the torch extra (conversion from HF, PEFT, BP reference); the pinned CPU torch goes in first
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,torch]"

demo: install
	$(PYTHON) -m edgezo.cli demo

test: install-torch
	$(PYTHON) -m pytest -q

bench: install
	$(PYTHON) bench/mezo_step.py
