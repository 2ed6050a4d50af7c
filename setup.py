"""fused_adam: fused Adam/AdamW for PyTorch.

torch is required but deliberately not declared: pip would otherwise replace a user's own torch
build (or pull a multi-GB CUDA wheel onto a CPU machine). triton is needed only on GPUs.
"""
from setuptools import find_packages, setup

setup(
    name="fused_adam",
    version="0.1.0",
    description="Fused Adam/AdamW optimizers for PyTorch over flat parameter buffers",
    packages=find_packages(include=["fused_adam", "fused_adam.*"]),
    python_requires=">=3.10",
    extras_require={"triton": ["triton"]},
)
