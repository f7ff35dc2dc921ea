# One command each, from a fresh clone (in a virtual environment: README, "Two commands"):  make demo  |  make test
PYTHON ?= python3
PIP = $(PYTHON) -m pip --disable-pip-version-check
# Every install takes the versions of the last green run (constraints.txt), so a dependency's new release cannot break
# these commands overnight (issue 28: transformers 5.25 did). `make test-newest` tries the newest releases instead;
# `make constraints` writes the environment a green run used back into the file.
CONSTRAINTS ?= constraints.txt
PIP_INSTALL = $(PIP) install $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: install install-llama-cpp install-torch demo test test-newest constraints lint bench arm64-check

# llama.cpp is built from source for this CPU (-march=native), but without its AMX kernels: on Intel Xeons with AMX,
# -march=native compiles ggml's AMX buffer type in and it crashed in ggml_backend_amx_mul_mat (docs/build.md).
# -mno-amx-* exist on x86-64 only. The build skips pip's wheel cache, which would otherwise hand back a wheel
# built earlier with other flags; an installed llama-cpp-python is kept only if it is 0.3.36 without AMX kernels.
LLAMA_CPP_PYTHON = llama-cpp-python==0.3.36
# On aarch64 (Raspberry Pi OS, Debian/Ubuntu arm64) no flag is added: llama.cpp's own -mcpu=native picks NEON, dotprod,
# i8mm, SVE as the CPU has them (README, "64-bit ARM").
UNAME_M ?= $(shell uname -m)
NO_AMX_FLAGS = $(if $(filter x86_64 amd64,$(UNAME_M)),-mno-amx-tile -mno-amx-int8 -mno-amx-bf16)
LLAMA_CPP_IS_SAFE = import llama_cpp, sys; sys.exit(llama_cpp.__version__ != "0.3.36" or b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info())

install-llama-cpp:  # ~5 min on 2 cores the first time
	@if $(PYTHON) -c '$(LLAMA_CPP_IS_SAFE)' 2>/dev/null; then echo "$(LLAMA_CPP_PYTHON) without AMX kernels is installed"; \
	else $(PIP) uninstall -y -q llama-cpp-python 2>/dev/null; \
	  CFLAGS="$(NO_AMX_FLAGS)" CXXFLAGS="$(NO_AMX_FLAGS)" $(PIP_INSTALL) --no-cache-dir $(LLAMA_CPP_PYTHON) \
	  && $(PYTHON) -c '$(LLAMA_CPP_IS_SAFE)'; fi

install: install-llama-cpp  # the core: llama-cpp-python, gguf, numpy, tqdm; no torch
	$(PIP_INSTALL) -e ".[dev]"

install-torch: install-llama-cpp  # the torch extra (conversion from HF, PEFT, BP reference); the pinned CPU torch goes in first
	$(PIP_INSTALL) torch==2.13.0
	$(PIP_INSTALL) -e ".[dev,torch]"

test: install-torch  # plus the serve extra, so tests/test_serve.py runs (it skips without it)
	$(PIP_INSTALL) -e ".[dev,torch,serve]"
	$(PYTHON) -m pytest -q

test-newest: install-torch  # the newest releases pyproject.toml allows, not constraints.txt's: what a future install gets
	$(PIP) install --upgrade --upgrade-strategy eager -e ".[dev,torch,serve]"
	$(PYTHON) -m pytest -q

constraints:  # after a green `make test` (or test-newest): pin this environment's versions for every later install (local
              # version labels such as torch's +cpu dropped: the same pins on other platforms)
	@{ echo "# The versions of the last green run (make constraints; Python $$($(PYTHON) -c 'import platform; print(platform.python_version())')," \
	    "$$(uname -m)). Every make target installs with -c constraints.txt; make test-newest ignores it."; \
	  $(PIP) freeze --exclude-editable | grep -v '^edgezo' | sed -E 's/\+[A-Za-z0-9.]+$$//'; } > constraints.txt

lint:  # pyflakes and pycodestyle through ruff (the dev extra); tests/test_lint.py runs the same
	$(PYTHON) -m ruff check edgezo tests bench

demo: install
	$(PYTHON) -m edgezo.cli demo


bench: install-torch  # every measurement the README and docs/ quote (~3 h on 2 idle cores), then their tables
	$(PIP_INSTALL) -e ".[dev,torch,bench]"
	$(PYTHON) -m bench.throughput
	$(PYTHON) -m bench.mezo_step
	$(PYTHON) -m bench.kernels
	$(PYTHON) -m bench.prefix_reuse
	$(PYTHON) -m bench.busy
	$(PYTHON) -m bench.layer_gradients --work runs/layer-gradients-$$(date +%s)
	$(PYTHON) -m bench.estimators --work runs/estimators-$$(date +%s) --time-steps 6
	$(PYTHON) -m bench.generative --work runs/generative-$$(date +%s)
	$(PYTHON) -m bench.compare
	$(PYTHON) -m bench.time_to_accuracy --launch --out-dir runs/bench-time-to-accuracy-$$(date +%s)
	$(PYTHON) -m bench.distributed
	$(PYTHON) -m bench.wire_bytes      # needs root (network namespaces)
	$(PYTHON) -m bench.memory_validation
	$(PYTHON) -m bench.budget_experiment --work runs/budget-$$(date +%s)
	$(PYTHON) -m bench.capacity_plot
	$(PYTHON) -m bench.fleet --write
	$(PYTHON) -m bench.report

arm64-check:  # edgezo on 64-bit ARM under qemu-user (root; Debian packages in tools/arm64-check): ~2.5 h the first time
              # on a shared 2-core host, then ~30 min (userland and builds cached); writes bench/results/arm64.jsonl and
              # arm64.md. Not in CI (too long for its 40 min): run it before a release and after engine or build changes
	nice -n 10 $(PYTHON) tools/arm64-check
