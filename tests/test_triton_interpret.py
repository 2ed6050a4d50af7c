"""The Triton kernel on CPU tensors under TRITON_INTERPRET=1, which Triton reads at import: the
whole torch.optim comparison matrix, triton cases only, runs again in a child process. The child
sees no GPU: on a GPU box the interpreter would otherwise also step CUDA tensors (copying them
to numpy), doubling its time and running cases that are not what a GPU computes."""
import fractions
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import INTERPRET

pytest.importorskip("triton")
TESTS = Path(__file__).parent


@pytest.mark.skipif(INTERPRET, reason="this is the child run")
def test_triton_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
           *(str(TESTS / f) for f in ("test_optimizer.py", "test_flat.py", "test_state_dict.py",
                                       "test_kernels_agree.py", "test_mixed_precision.py",
                                       "test_stochastic_rounding.py", "test_clipping.py",
                                       "test_skip_nonfinite.py", "test_capturable.py",
                                       "test_quantized.py", "test_triton_interpret.py"))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout


@pytest.mark.skipif(not INTERPRET, reason="runs in the interpreted child")
def test_triton_child_sees_no_gpu():
    import torch
    assert not torch.cuda.is_available()


@pytest.mark.skipif(not INTERPRET, reason="runs in the interpreted child")
def test_triton_interpreter_fma_rounds_once():
    from interpreter_fixes import probe
    assert probe()[0] == 2**-11 + 2**-24


def test_fma_fix_is_correctly_rounded():
    """tests/interpreter_fixes.py's fp32 fma against exact rational arithmetic, on random
    triples and on products that cancel against the addend (where double rounding shows)."""
    from interpreter_fixes import fma_fp32
    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000).astype(np.float32)
    y = (rng.standard_normal(4000) * 2.0 ** rng.integers(-30, 30, 4000)).astype(np.float32)
    z = np.where(rng.random(4000) < 0.5, -(x.astype(np.float64) * y).astype(np.float32),
                 rng.standard_normal(4000).astype(np.float32))
    got = fma_fp32(x, y, z)
    for a, b, c, r in zip(x.tolist(), y.tolist(), z.tolist(), got.tolist()):
        exact = fractions.Fraction(a) * fractions.Fraction(b) + fractions.Fraction(c)
        candidates = np.float32(float(exact)), np.nextafter(np.float32(float(exact)), np.float32(np.inf)), \
            np.nextafter(np.float32(float(exact)), np.float32(-np.inf))
        best = min(candidates, key=lambda f: (abs(fractions.Fraction(float(f)) - exact),
                                              int(np.float32(f).view(np.int32)) & 1))
        assert r == float(best), (a, b, c, r, float(best))
