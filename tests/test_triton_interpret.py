"""The Triton kernel on CPU tensors under TRITON_INTERPRET=1, which Triton reads at import: the
whole torch.optim comparison matrix, triton cases only, runs again in a child process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
TESTS = Path(__file__).parent


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="this is the child run")
def test_triton_kernel_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", "triton",
           *(str(TESTS / f) for f in ("test_optimizer.py", "test_flat.py", "test_state_dict.py",
                                       "test_kernels_agree.py", "test_mixed_precision.py",
                                       "test_stochastic_rounding.py", "test_clipping.py",
                                       "test_skip_nonfinite.py", "test_capturable.py"))]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=TESTS.parent)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
    assert " passed" in out.stdout and " failed" not in out.stdout
