"""fused_adam: fused Adam/AdamW for PyTorch.

Builds the optional extension `fused_adam._C` (csrc/): the CPU kernel whenever a C++ compiler
exists, plus the CUDA kernel when torch is a CUDA build and nvcc is found. FUSED_ADAM_NO_EXT=1
skips it; a failed build prints one line and the package still installs (the extension then
JIT-builds on first use, or the torch backend is used). Build with `--no-build-isolation` so the
extension compiles against the torch you run.

torch is required but deliberately not declared: pip would otherwise replace a user's own torch
build (or pull a multi-GB CUDA wheel onto a CPU machine).
"""
import importlib.util
import os
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def extension():
    """(ext_modules, cmdclass) for the build, or ([], {}) with one line saying why not."""
    if os.environ.get("FUSED_ADAM_NO_EXT") == "1":
        print("fused_adam: extension skipped (FUSED_ADAM_NO_EXT=1)")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as exc:
        print(f"fused_adam: extension skipped, torch is not importable at build time ({exc})")
        return [], {}
    # The sources and flags live in fused_adam/_ext.py (shared with the JIT build); load that
    # file alone, without importing the package.
    spec = importlib.util.spec_from_file_location("_ext", ROOT / "fused_adam" / "_ext.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    with_cuda = torch.version.cuda is not None and ext.use_cuda_home(cpp_extension)
    sources = [f"csrc/{s}" for s in ext.CPU_SOURCES + (ext.CUDA_SOURCES if with_cuda else [])]
    kind = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    module = kind("fused_adam._C", sources,
                  extra_compile_args={"cxx": ext.CXX_FLAGS, "nvcc": ext.NVCC_FLAGS},
                  extra_link_args=ext.LD_FLAGS)

    class OptionalBuildExt(cpp_extension.BuildExtension):
        def run(self):
            try:
                super().run()
            except Exception as exc:  # noqa: BLE001 - the extension is optional
                print(f"fused_adam: extension build failed, installing without it: {exc}")

    return [module], {"build_ext": OptionalBuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = extension()
setup(
    name="fused_adam",
    version="0.1.0",
    description="Fused Adam/AdamW optimizers for PyTorch over flat parameter buffers",
    packages=find_packages(include=["fused_adam", "fused_adam.*"]),
    python_requires=">=3.10",
    extras_require={"triton": ["triton"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
