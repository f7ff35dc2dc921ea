# One command each, from a fresh clone:  make demo  |  make test
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check

.PHONY: install install-llama-cpp install-torch demo test lint bench

# llama.cpp is built from source for this CPU (-march=native), but without its AMX kernels: on Intel Xeons with AMX,
# -march=native compiles ggml's AMX buffer type in and it crashed in ggml_backend_amx_mul_mat (README, "The llama.cpp
# build"). -mno-amx-* exist on x86-64 only. The build skips pip's wheel cache, which would otherwise hand back a wheel
# built earlier with other flags; an installed llama-cpp-python is kept only if it is 0.3.36 without AMX kernels.
LLAMA_CPP_PYTHON = llama-cpp-python==0.3.36
NO_AMX_FLAGS = $(if $(filter x86_64 amd64,$(shell uname -m)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_IS_SAFE = import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36" or b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())

install-llama-cpp:  # ~5 min on 2 cores the first time
	@if $(PYTHON) -c '$(LLAMA_CPP_IS_SAFE)' 2>/dev/null; then echo "$(LLAMA_CPP_PYTHON) without AMX kernels is installed"; \
	else $(PIP) uninstall -y -q llama-cpp-python 2>/dev/null; \
	  CFLAGS="$(NO_AMX_FLAGS)" CXXFLAGS="$(NO_AMX_FLAGS)" $(PIP) install --no-cache-dir $(LLAMA_CPP_PYTHON) \
	  && $(PYTHON) -c '$(LLAMA_CPP_IS_SAFE)'; fi

install: install-llama-cpp  # the core: llama-cpp-python, gguf, numpy, tqdm; no torch
	$(PIP) install -e ".[dev]"

install-torch: install-llama-cpp  # the torch extra (conversion from HF, PEFT, BP reference); the pinned CPU torch goes in first
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev,torch]"

test: install-torch  # plus the serve extra, so tests/test_serve.py runs (it skips without it)
	$(PIP) install -e ".[dev,torch,serve]"
	$(PYTHON) -m pytest -q

lint:  # pyflakes and pycodestyle through ruff (the dev extra); tests/test_lint.py runs the same
	$(PYTHON) -m ruff check edgezo tests bench

demo: install
	$(PYTHON) -m edgezo.cli demo


bench: install-torch  # every measurement the README and docs/ quote (~3 h on 2 idle cores), then their tables
	$(PIP) install -e ".[dev,torch,bench]"
	$(PYTHON) bench/throughput.py
	$(PYTHON) bench/mezo_step.py
	$(PYTHON) bench/kernels.py
	$(PYTHON) bench/prefix_reuse.py
	$(PYTHON) bench/layer_gradients.py --work runs/layer-gradients-$$(date +%s)
	$(PYTHON) bench/estimators.py --work runs/estimators-$$(date +%s) --time-steps 6
	$(PYTHON) bench/generative.py --work runs/generative-$$(date +%s)
	$(PYTHON) bench/compare.py
	$(PYTHON) bench/time_to_accuracy.py --launch --out-dir runs/bench-time-to-accuracy-$$(date +%s)
	$(PYTHON) bench/distributed.py
	$(PYTHON) bench/wire_bytes.py      # needs root (network namespaces)
	$(PYTHON) bench/memory_validation.py
	$(PYTHON) bench/budget_experiment.py --work runs/budget-$$(date +%s)
	$(PYTHON) bench/capacity_plot.py
	$(PYTHON) bench/fleet.py --write
	$(PYTHON) bench/report.py
