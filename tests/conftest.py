"""Shared helpers: devices and backends to test, the tolerance table, the torch comparison."""
import os

import pytest
import torch

import fused_adam
from fused_adam.backends.triton_kernel import BLOCK

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# gloo (the distributed tests' processes) picks its interface by the host name, which on a box
# with no network may resolve to nothing; every process of these tests is on this host.
os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
# Under the interpreter: its fma made to round once where it does not (tests/interpreter_fixes.py).
INTERPRETER_TRUNCATES_BF16 = INTERPRET and __import__("interpreter_fixes").apply()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# (device, backend) pairs that can run here. Under TRITON_INTERPRET=1 the CPU gains "triton",
# which tests/test_triton_interpret.py runs in its own process.
CASES = [pytest.param(d, b, id=f"{d}-{b}") for d in DEVICES for b in fused_adam.available_backends(d)]
# Sizes around the kernel's block and a prime; under the interpreter each program runs in numpy,
# so the large sizes stay out.
SHAPES = [(), (1,), (BLOCK - 1,), (BLOCK + 1,), (7919,), (31, 17), (0, 3)]

# max |ours - reference| <= rtol * |reference| + atol, per tensor, after 20 steps.
TOLERANCE = {
    # torch backend vs torch.optim, fp32: the same ATen ops on the same values. Only elements in
    # the scalar tail of ATen's vector loops (a chunk's last < 16 elements) may round 1 ulp apart.
    ("torch", torch.float32): dict(rtol=1e-6, atol=1e-7),
    # triton vs torch.optim on CPU, fp32: triton's sqrt is correctly rounded; torch's CPU sqrt is
    # not (it differs from the rounded float64 sqrt in ~17% of elements, 1 ulp, torch 2.13 AVX-512),
    # so denominators differ by 1 ulp and params by ~1 ulp of the update.
    ("triton", torch.float32): dict(rtol=1e-6, atol=1e-7),
    # The extension's kernels (csrc/) round exactly as the Triton kernel does (bitwise equal,
    # tests/test_kernels_agree.py), so they sit at the same distance from torch.optim.
    ("cpu", torch.float32): dict(rtol=1e-6, atol=1e-7),
    ("cuda", torch.float32): dict(rtol=1e-6, atol=1e-7),
    # A training loop feeds each step's params into the next gradients: the 1-ulp sqrt difference
    # above grows where |grad| ~ eps-scale (m/sqrt(v) is then ill-conditioned). Measured after 8
    # steps of tests/test_flat.py's model: 5e-6 absolute, 2e-4 relative.
    ("triton", "training loop"): dict(rtol=1e-3, atol=2e-5),
    ("torch", "training loop"): dict(rtol=1e-6, atol=1e-7),
    ("cpu", "training loop"): dict(rtol=1e-3, atol=2e-5),
    ("cuda", "training loop"): dict(rtol=1e-3, atol=2e-5),
}


def forbid_host_sync(monkeypatch, names=("item", "__bool__", "__float__", "tolist")):
    """From here on any read of a tensor's value on the host (.item(), bool(), float(),
    .tolist()) fails the test: what a GPU step must not do."""
    def refuse(*args):
        raise AssertionError("host sync in the step")

    for name in names:
        monkeypatch.setattr(torch.Tensor, name, refuse)


def interpreted(backend) -> bool:
    """Whether `backend` runs under the Triton interpreter here (this process has no CUDA then:
    tests/test_triton_interpret.py hides it)."""
    return backend == "triton" and INTERPRET


def skip_if_interpreted_bf16(device, backend, dtypes):
    """The interpreter of triton 3.6 and 3.9 truncates fp32 -> bf16 instead of rounding to
    nearest even (see test_kernels_agree.py, where that is an expected failure); bf16 results of
    the interpreted kernel are not what a GPU computes, so tests of bf16 storage skip it."""
    if interpreted(backend) and torch.bfloat16 in dtypes and INTERPRETER_TRUNCATES_BF16:
        pytest.skip("the Triton interpreter truncates to bf16")


def assert_close(actual, expected, backend, what="", key=None):
    tol = TOLERANCE[(backend, key or (torch.float32 if expected.is_complex() else expected.dtype))]
    torch.testing.assert_close(actual, expected, rtol=tol["rtol"], atol=tol["atol"],
                               msg=lambda m: f"{what}: {m}")


def assert_optimizers_match(ours, ref, backend, key=None):
    """Params and every state tensor of `ours` equal `ref`'s, param by param."""
    ours_params = [p for g in ours.param_groups for p in g["params"]]
    ref_params = [p for g in ref.param_groups for p in g["params"]]
    for i, (p, q) in enumerate(zip(ours_params, ref_params, strict=True)):
        assert_close(p.detach(), q.detach(), backend, f"param {i}", key)
        s, r = ours.state.get(p, {}), ref.state.get(q, {})
        assert s.keys() == r.keys(), f"param {i}: state keys {sorted(s)} != {sorted(r)}"
        for name in r:
            if name == "step":
                assert float(s[name]) == float(r[name]), f"param {i}: step {s[name]} != {r[name]}"
            else:
                assert_close(s[name], r[name], backend, f"param {i} {name}", key)


def randn(shape, gen, dtype=torch.float32):
    """Normal draws in fp32, then cast: torch's RNG path for bf16/fp16/fp64/complex differs between
    versions (seeded bf16 draws of 2.11 and 2.13 differ), fp32's does not."""
    if dtype.is_complex:
        return torch.view_as_complex(torch.randn(*shape, 2, generator=gen)).to(dtype)
    return torch.randn(shape, generator=gen).to(dtype)


def make_params(shapes, device, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [randn(s, gen, dtype).to(device).requires_grad_() for s in shapes]


def clone_params(params):
    return [p.detach().clone().requires_grad_() for p in params]


def set_grads(params_a, params_b, step, skip=()):
    """Give both param lists the same fresh gradients (drawn in a's dtype, then cast to b's);
    params whose index is in `skip` get None."""
    gen = torch.Generator().manual_seed(1000 + step)
    for i, (a, b) in enumerate(zip(params_a, params_b, strict=True)):
        if i in skip:
            a.grad = b.grad = None
            continue
        g = randn(a.shape, gen, a.dtype).to(a.device)
        a.grad, b.grad = g.clone(), g.to(b.dtype, copy=True)


def pytest_collection_modifyitems(items):
    """Mark every test that steps CUDA tensors `cuda` (a `cuda` device or backend among its
    parameters, or marked by hand): `make gpu-check` runs just those on a GPU box, CI runs the
    rest."""
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        values = [v for p in params.values() for v in (p if isinstance(p, (tuple, list)) else (p,))]
        if any(str(v) == "cuda" or str(v).startswith("cuda:") for v in values):
            item.add_marker(pytest.mark.cuda)
