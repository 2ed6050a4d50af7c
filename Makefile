# make test   : set up .venv (torch 2.13.0 CPU wheel, triton, pytest, ninja), build the extension
#               (csrc/, into fused_adam/_C) and run every test
# make bench  : the benchmark on the best device here: table, JSON/CSV and plots under
#               bench/results/, then the README's results section regenerated from them
# make demo   : the convergence demo (bench/convergence.py): torch.optim.AdamW vs ours, ~1 min
# make gpu-check : on a GPU box with its own torch/triton (no network, no venv): tests + benchmark
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0

.PHONY: test bench demo gpu-check clean

# A python that already has torch (a GPU box) keeps it: the venv then sees system packages and
# pip installs only what is missing, so an unpinned torch (a multi-GB CUDA build) is never pulled.
$(VENV)/.ready: Makefile
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
		$(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON) -m venv $(VENV); \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	@$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q "$(TRITON)"
	@$(PY) -c "import pytest, numpy, ninja, matplotlib" 2>/dev/null || \
		$(PY) -m pip install -q pytest numpy ninja matplotlib
	@# For the Hugging Face Trainer test only (optional for users; its test skips without them).
	@$(PY) -c "import transformers, accelerate" 2>/dev/null || \
		$(PY) -m pip install -q transformers accelerate || echo "transformers not installed: its test skips"
	@touch $@

# The extension is optional: a failed build leaves the package working (see `pip install -v .`).
$(VENV)/.ext: $(VENV)/.ready setup.py fused_adam/_ext.py $(wildcard csrc/*)
	$(PY) -m pip install -q -e . --no-build-isolation
	@$(PY) -c "import importlib.util as u; print('fused_adam extension:', 'built' if u.find_spec('fused_adam._C') else 'not built (FUSED_ADAM_NO_EXT=1 or build failed)')"
	@touch $@

test: $(VENV)/.ext
	$(PY) -m pytest -q

bench: $(VENV)/.ext
	PYTHONPATH=. $(PY) bench/bench.py
	$(PY) bench/report.py

demo: $(VENV)/.ext
	PYTHONPATH=. $(PY) bench/convergence.py

gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
