"""Shared helpers: devices and backends to test, the tolerance table, the torch comparison."""
import os

import pytest
import torch

import fused_adam
from fused_adam.backends.triton_kernel import BLOCK

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs that can run here. Under TRITON_INTERPRET=1 the CPU gains "triton",
# which tests/test_triton_interpret.py runs in its own process.
CASES = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fused_adam.available_backends(d)]
# Sizes around the kernel's block and a prime; under the interpreter each program runs in numpy,
# so the large sizes stay out.
SHAPES = [(), (1,), (BLOCK - 1,), (BLOCK + 1,), (7919,), (31, 17)]

# max |ours - reference| <= rtol * |reference| + atol, per tensor, after 20 steps.
TOLERANCE = {
    # torch backend vs torch.optim, fp32: the same ATen ops on the same values. Only elements in
    # the scalar tail of ATen's vector loops (a chunk's last < 16 elements) may round 1 ulp apart.
    ("torch", torch.float32): dict(rtol=1e-6, atol=1e-7),
    # triton vs torch.optim on CPU, fp32: triton's sqrt is correctly rounded; torch's CPU sqrt is
    # not (it differs from the rounded float64 sqrt in ~17% of elements, 1 ulp, torch 2.13 AVX-512),
    # so denominators differ by 1 ulp and params by ~1 ulp of the update.
    ("triton", torch.float32): dict(rtol=1e-6, atol=1e-7),
}


def assert_close(actual, expected, backend, what=""):
    tol = TOLERANCE[(backend, expected.dtype if not expected.is_complex() else torch.float32)]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"],
                               msg=lambda m: f"{what}: {m}")


def assert_optimizers_match(ours, ref, backend):
    """Params and every state tensor of `ours` equal `ref`'s, param by param."""
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(ours_params, ref_params, strict=True)):
        assert_close(p.detach(), q.detach(), backend, f"param {i}")
        s, r = ours.state.get(p, {}), ref.state.get(q, {})
        assert s.keys() == r.keys(), f"param {i}: state keys {sorted(s)} != {sorted(r)}"
        for key in r:
            if key == "step":
                assert float(s[key]) == float(r[key]), f"param {i}: step {s[key]} != {r[key]}"
            else:
                assert_close(s[key], r[key], backend, f"param {i} {key}")


def make_params(shapes, device, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params_a, params_b, step, skip=()):
    """Give both param lists the same fresh gradients; params whose index is in `skip` get None."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        if i in skip:
            a.grad = b.grad = None
            continue
        g = torch.randn(a.shape, generator=gen, dtype=a.dtype).to(a.device)
        a.grad, b.grad = g.clone(), g.clone()
