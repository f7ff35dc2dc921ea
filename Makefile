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

bench: install-torch  # every measurement the README and docs/ quote (~3 h on 2 idle cores), then their tables
	$(PIP) install -e ".[dev,torch,bench]"
	$(PYTHON) bench/throughput.py
	$(PYTHON) bench/mezo_step.py
	$(PYTHON) bench/compare.py
	$(PYTHON) bench/time_to_accuracy.py --launch --out-dir runs/bench-time-to-accuracy-$$(date +%s)
	$(PYTHON) bench/distributed.py
	$(PYTHON) bench/wire_bytes.py      # needs root (network namespaces)
	$(PYTHON) bench/memory_validation.py
	$(PYTHON) bench/budget_experiment.py --work runs/budget-$$(date +%s)
	$(PYTHON) bench/capacity_plot.py
	$(PYTHON) bench/fleet.py --write
	$(PYTHON) bench/report.py
