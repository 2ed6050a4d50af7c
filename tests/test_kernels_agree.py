"""The kernels (Triton, the extension's CPU and CUDA kernels) implement one math contract with
the same roundings, so on the same inputs they must agree bit for bit, for every mode and dtype.
Pairs that cannot run here skip: the CPU pair runs in the TRITON_INTERPRET=1 child process."""
import itertools

import pytest
import torch

import fused_adam
from fused_adam.functional import adam_step_

KERNELS = [("triton", "cpu"), ("triton", "cuda"), ("cpu", "cuda")]
DTYPES = [  # (param, grad, state)
    (torch.float32, torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16, torch.float16),
]
MODES = list(itertools.product([False, True], [0.0, 0.1], [False, True], [False, True]))


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("pair", KERNELS, ids="-vs-".join)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: str(d[0]).split(".")[1])
def test_kernels_agree_bitwise(pair, dtypes, request):
    for backend in pair:
        if backend not in fused_adam.available_backends(_device(backend), dtypes[0]):
            pytest.skip(f"{backend} is not available here")
    if "triton" in pair and _device("triton") == "cpu" and dtypes[0] == torch.bfloat16:
        # triton 3.9's interpreter truncates fp32 -> bf16 (1 + 3*2**-8 gives 1.0078125, not
        # 1.015625), ignoring fp_downcast_rounding; compiled kernels round to nearest even.
        request.applymarker(pytest.mark.xfail(strict=True, reason="interpreter truncates to bf16"))
    p_dtype, g_dtype, s_dtype = dtypes
    gen = torch.Generator().manual_seed(0)
    n = 4099  # not a multiple of any vector width or block
    for maximize, wd, decoupled, amsgrad in MODES:
        base = [torch.randn(n, generator=gen).to(p_dtype), torch.randn(n, generator=gen).to(g_dtype),
                (torch.randn(n, generator=gen) * 0.1).to(s_dtype),
                (torch.rand(n, generator=gen) * 0.01).to(s_dtype),
                (torch.rand(n, generator=gen) * 0.02).to(s_dtype)]
        results = []
        for backend in pair:
            ts = [t.to(_device(backend), copy=True) for t in base]
            for step in (1, 2, 7):
                adam_step_(*ts[:4], ts[4] if amsgrad else None, step=step, lr=1e-2, beta1=0.9,
                           beta2=0.999, eps=1e-8, weight_decay=wd, decoupled_weight_decay=decoupled,
                           maximize=maximize, backend=backend)
            results.append([t.cpu() for t in ts])
        for name, a, b in zip(("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"), *results):
            assert torch.equal(a, b), (f"{pair} differ in {name} for maximize={maximize} wd={wd} "
                                       f"decoupled={decoupled} amsgrad={amsgrad}")
