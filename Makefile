# make test   : set up .venv (torch 2.13.0 CPU wheel, triton, pytest, ninja), build the extension
#               (csrc/, into fused_adam/_C) and run every test
# make bench  : the benchmark on the best device here: table, JSON/CSV and plots under
#               bench/results/, then the README's results section regenerated from them
# make demo   : the convergence demo (bench/convergence.py): torch.optim.AdamW vs ours, ~1 min
# make gpu-check : on a GPU box with its own torch/triton (no network, no venv): environment,
#               extension build, benchmark, CUDA tests, compute-sanitizer; each stage time-capped,
#               results written as it goes (bench/gpu_check.py; GPU_CHECK_ARGS passes options)
# make compat : rehearse the GPU box on this CPU machine (not CI: several GB, ~15 min): a venv with
#               its versions (CUDA torch 2.11.0, triton 3.6.0), the extension built WITH its CUDA
#               part (setup.py and the JIT path), the whole suite, then gpu-check's stages
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
TRITON ?= triton==3.9.0

COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(abspath $(COMPAT_VENV))/bin/python
COMPAT_PINS ?= torch==2.11.0 triton==3.6.0
COMPAT_DIR := build/compat

.PHONY: test bench demo gpu-check compat clean

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
	PYTHONPATH=. $(PY) bench/bench.py --no-plots
	$(PY) bench/report.py

demo: $(VENV)/.ext
	PYTHONPATH=. $(PY) bench/convergence.py

gpu-check:
	PYTHONPATH=. $(PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The CUDA build of torch from the registry (pip caches its wheels between runs); no GPU needed
# to import it or to build against its headers with the local nvcc.
$(COMPAT_VENV)/.ready:
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q $(COMPAT_PINS) pytest pytest-xdist pytest-timeout numpy ninja matplotlib setuptools wheel
	@touch $@

# A copy of the tree, so that its extension (same file name, other torch ABI) never replaces the
# one .venv uses. TORCH_CUDA_ARCH_LIST: no GPU to detect the architecture from; the box's are these.
compat: $(COMPAT_VENV)/.ready
	rm -rf $(COMPAT_DIR) && mkdir -p $(COMPAT_DIR)
	git ls-files -co --exclude-standard | tar -cf - -T - | tar -xf - -C $(COMPAT_DIR)
	cd $(COMPAT_DIR) && TORCH_CUDA_ARCH_LIST="8.0;9.0" $(COMPAT_PY) -m pip install -q -e . --no-build-isolation
	cd $(COMPAT_DIR) && $(COMPAT_PY) -c "from fused_adam import _ext; assert _ext.load() is None and _ext.has_kernel('cuda'), _ext.load(); print('setup.py build: CPU and CUDA kernels')"
	cd $(COMPAT_DIR) && TORCH_CUDA_ARCH_LIST="9.0" TORCH_EXTENSIONS_DIR=$(abspath $(COMPAT_DIR))/jit $(COMPAT_PY) -m fused_adam._ext --jit-cuda
	cd $(COMPAT_DIR) && $(COMPAT_PY) -m pytest -q -p no:cacheprovider -ra
	cd $(COMPAT_DIR) && OUT=$(abspath $(COMPAT_DIR))/gpu-check $(COMPAT_PY) bench/gpu_check.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache
