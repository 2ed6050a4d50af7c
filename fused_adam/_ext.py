"""The one module that loads the compiled extension (`torch.ops.fused_adam.adam_step_`).

It is `fused_adam/_C*.so` when `pip install` built it, else a JIT build of the same sources with
ninja (`torch.utils.cpp_extension.load`, cached under TORCH_EXTENSIONS_DIR) on first use; that is
how a GPU box with no network gets it. FUSED_ADAM_NO_EXT=1 disables both. setup.py reads the
sources and flags below without importing the package, so they are kept in one place.
"""
from __future__ import annotations

import os
from pathlib import Path

CSRC = Path(__file__).resolve().parent.parent / "csrc"
CPU_SOURCES = ["ops.cpp", "adam_cpu.cpp"]
CUDA_SOURCES = ["ops_cuda.cpp", "adam_cuda.cu"]
# -ffp-contract=off / --fmad=false: no FMA the math contract does not name (csrc/adam_math.h).
# -fno-math-errno and -fno-trapping-math let sqrtf and the branches on the flags vectorize;
# -fopenmp makes at::parallel_for use torch's threads.
CXX_FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-fopenmp"]
NVCC_FLAGS = ["-O3", "--fmad=false"]
LD_FLAGS = ["-fopenmp"]

_state: dict[str, object] = {}


def load():
    """Load the extension once; returns None on success, else the reason it is unavailable."""
    if "reason" not in _state:
        _state["reason"] = _load()
    return _state["reason"]


def _load() -> str | None:
    if os.environ.get("FUSED_ADAM_NO_EXT") == "1":
        return "disabled by FUSED_ADAM_NO_EXT=1"
    import importlib.util

    import torch

    spec = importlib.util.find_spec("fused_adam._C")
    try:
        if spec is not None and spec.origin:
            torch.ops.load_library(spec.origin)
        else:
            _jit_build(torch)
    except Exception as exc:  # noqa: BLE001 - any build or load failure disables the backend
        return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return None


def _jit_build(torch) -> None:
    from torch.utils import cpp_extension

    with_cuda = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None
    sources = CPU_SOURCES + (CUDA_SOURCES if with_cuda else [])
    cpp_extension.load(
        name="fused_adam_C" + ("_cuda" if with_cuda else ""),
        sources=[str(CSRC / s) for s in sources],
        extra_cflags=CXX_FLAGS,
        extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=LD_FLAGS, with_cuda=with_cuda,
        is_python_module=False, verbose=False)


def has_kernel(device_type: str) -> bool:
    """Whether the loaded extension has a kernel for `device_type` ("cpu" or "cuda")."""
    import torch

    key = {"cpu": "CPU", "cuda": "CUDA"}[device_type]
    return torch._C._dispatch_has_kernel_for_dispatch_key("fused_adam::adam_step_", key)
