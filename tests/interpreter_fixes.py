"""What the tests need of the Triton interpreter (TRITON_INTERPRET=1), probed on the installed
triton rather than assumed from its version.

- tl.fma must round once. triton 3.6's interpreter computes it as `x * y + z` in fp32, rounding
  twice (3.9's rounds once), so the kernel's bits would differ from a GPU's and from the CPU
  kernel's. Where the probe finds that, the interpreter's fp32 fma is replaced, for these test
  runs only, by a correctly rounded one.
- apply() returns whether fp32 -> bf16 truncates (3.6 and 3.9 both do) instead of
  rounding to nearest even as compiled kernels do.
"""
import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter


@triton.jit
def _probe(x_ptr, fma_ptr, bf16_ptr):
    x = tl.load(x_ptr + tl.arange(0, 4))
    a = tl.sum(tl.where(tl.arange(0, 4) == 0, x, 0.0), 0)
    b = tl.sum(tl.where(tl.arange(0, 4) == 1, x, 0.0), 0)
    c = tl.sum(tl.where(tl.arange(0, 4) == 2, x, 0.0), 0)
    tl.store(fma_ptr, tl.fma(a, b, c))
    tl.store(bf16_ptr, tl.sum(tl.where(tl.arange(0, 4) == 3, x, 0.0), 0).to(tl.bfloat16))


def probe():
    """(fma(1 + 2**-12, 1 + 2**-12, -1), bf16(1 + 3 * 2**-8)) as the interpreter computes them.
    Exact: 2**-11 + 2**-24 (x * y rounded first gives 2**-11) and 1.015625 (truncated: 1.0078125)."""
    x = torch.tensor([1 + 2**-12, 1 + 2**-12, -1.0, 1 + 3 * 2**-8])
    fma, bf16 = torch.zeros(1), torch.zeros(1, dtype=torch.bfloat16)
    _probe[(1,)](x, fma, bf16)
    return fma.item(), bf16.item()


def fma_fp32(x, y, z):
    """Correctly rounded fp32 fma in numpy: the product is exact in fp64 (24 + 24 bits), the
    fp64 sum is rounded to odd (TwoSum gives its error), and rounding that to fp32 is then
    correct, as 53 >= 2 * 24 + 2."""
    p, z64 = x.astype(np.float64) * y.astype(np.float64), z.astype(np.float64)
    s = p + z64
    bp = s - z64
    err = (p - bp) + (z64 - (s - bp))
    inexact_even = np.isfinite(s) & (err != 0) & ((s.view(np.int64) & 1) == 0)
    toward = np.where(err > 0, np.inf, -np.inf)
    return np.where(inexact_even, np.nextafter(s, toward), s).astype(np.float32)


def apply() -> bool:
    """Under TRITON_INTERPRET=1: make the interpreter's fp32 fma round once where it does not;
    returns whether it truncates to bf16."""
    if probe()[0] != 2**-11 + 2**-24:
        double_rounded = interpreter.InterpreterBuilder.create_fma

        def create_fma(self, x, y, z):
            if z.data.dtype != np.float32:
                return double_rounded(self, x, y, z)
            return interpreter.TensorHandle(fma_fp32(*np.broadcast_arrays(x.data, y.data, z.data)),
                                            z.dtype.scalar)

        interpreter.InterpreterBuilder.create_fma = create_fma
    return probe()[1] != 1.015625
