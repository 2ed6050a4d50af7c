"""The one module that loads the compiled extension: `torch.ops.fused_adam.adam_step_`, and as
a Python module `addresses` (csrc/census.cpp), the per-step checks of many tensors.

It is `fused_adam/_C*.so` when `pip install` built it, else a JIT build of the same sources with
ninja (`torch.utils.cpp_extension.load`, cached under TORCH_EXTENSIONS_DIR) on first use; that is
how a GPU box with no network gets it. FUSED_ADAM_NO_EXT=1 disables both. setup.py reads the
sources and flags below without importing the package, so they are kept in one place.

`python -m fused_adam._ext` loads (or builds) it verbosely and says why not: `make gpu-check`
saves that log, since a failed build on a lent GPU box cannot be rerun. `--jit-cuda` JIT-builds
the CUDA part even where no GPU is visible: `make compat` rehearses the GPU box's build with it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ["ops.cpp", "adam_cpu.cpp", "census.cpp"]
CUDA_SOURCES = ["ops_cuda.cpp", "adam_cuda.cu"]
# -ffp-contract=off / --fmad=false: no FMA the math contract does not name (csrc/adam_math.h).
# -fno-math-errno and -fno-trapping-math let sqrtf and the branches on the flags vectorize;
# -fopenmp makes at::parallel_for use torch's threads.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LD_FLAGS = ["-fopenmp"]

_state: dict[str, object] = {}


def load(verbose: bool = False):
    """Load the extension once; returns None on success, else the reason it is unavailable."""
    if "reason" not in _state:
        _state["reason"] = _load(verbose)
    return _state["reason"]


def _load(verbose: bool) -> str | None:
    if os.environ.get("FUSED_ADAM_NO_EXT") == "1":
        return "disabled by FUSED_ADAM_NO_EXT=1"
    import importlib
    import importlib.util

    import torch

    try:  # (importing it registers its ops)
        if importlib.util.find_spec("fused_adam._C") is not None:
            _state["module"] = importlib.import_module("fused_adam._C")
        else:
            _state["module"] = _jit_build(torch, verbose)
    except Exception as exc:  # noqa: BLE001 - any build or load failure disables the backend
        return failure_reason(exc)
    return None


def module():
    """The extension's Python module once it is loaded, else None (loads nothing)."""
    return _state.get("module")


def failure_reason(exc: Exception) -> str:
    """One paragraph of why a build or load failed: the exception's first line, the compiler's
    error lines (ninja's output buries them under command lines; its last line only says
    `ninja: build stopped: subcommand failed.`) and that last line."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    errors = [line for line in lines[1:-1] if re.search(r"\berror\b|fatal|undefined reference", line,
                                                         re.IGNORECASE)]
    return f"{type(exc).__name__}: " + " | ".join(dict.fromkeys(lines[:1] + errors[:12] + lines[-1:]))


def cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME when it has the headers, else where nvcc says it lives,
    else /usr/local/cuda. torch guesses `dirname(dirname(which nvcc))`, which is wrong for an
    `nvcc` wrapper outside the toolkit (this CI machine's /usr/local/bin/nvcc execs
    /usr/local/cuda-13.0/bin/nvcc: torch's guess, /usr/local, has no cuda_runtime.h)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        try:  # nvcc --dryrun prints its own variables, `_HERE_` being its real bin directory
            out = subprocess.run([nvcc, "--dryrun", "-c", "x.cu"], capture_output=True, text=True,
                                 timeout=10).stderr
            here = re.search(r"^#\$ _HERE_=(.+)$", out, re.MULTILINE)
            candidates.append(str(Path(here.group(1).strip()).parent) if here else None)
        except (OSError, subprocess.SubprocessError):
            pass
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in filter(None, candidates):
        if (Path(root) / "include" / "cuda_runtime.h").exists():
            return root
    return None


def _jit_build(torch, verbose: bool, cuda: bool | None = None):
    """Build with ninja and load (returns the module); the CUDA part when a GPU is visible (or
    `cuda`) and a toolkit is found."""
    from torch.utils import cpp_extension

    wanted = torch.cuda.is_available() if cuda is None else cuda
    with_cuda = wanted and use_cuda_home(cpp_extension)
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    return cpp_extension.load(
        name="fused_adam_C" + ("_cuda" if with_cuda else ""),
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS, with_cuda=with_cuda,
        is_python_module=True, verbose=verbose)


def use_cuda_home(cpp_extension) -> bool:
    """Point torch's build at cuda_home() (setup.py does the same); False when there is none."""
    root = cuda_home()
    if root is not None:
        os.environ["CUDA_HOME"] = cpp_extension.CUDA_HOME = root
    return root is not None


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for `device_type` ("cpu" or "cuda")."""
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_adam::adam_step_", key)


if __name__ == "__main__":
    import torch

    print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: {torch.cuda.is_available()}, "
          f"CUDA_HOME: {cuda_home()}", flush=True)
    if "--jit-cuda" in sys.argv[1:]:
        try:
            _state["module"] = _jit_build(torch, verbose=True, cuda=True)
            _state["reason"] = None if has_kernel("cuda") else "built without its CUDA kernel"
        except Exception as exc:  # noqa: BLE001 - reported below
            _state["reason"] = failure_reason(exc)
    reason = load(verbose=True)
    if reason is None and torch.cuda.is_available() and not has_kernel("cuda"):
        reason = "built without its CUDA kernel although a GPU is visible (no CUDA toolkit found?)"
    print("fused_adam extension:", "loaded, kernels for " + ", ".join(
        d for d in ("cpu", "cuda") if reason is None and has_kernel(d)) if reason is None
          else f"unavailable: {reason}", flush=True)
    sys.exit(reason is not None)
