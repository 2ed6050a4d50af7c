"""max_grad_norm: the clip coefficient computed on the device and applied inside the update
kernel equals torch.nn.utils.clip_grad_norm_ followed by torch.optim.AdamW."""
import pytest
import torch

from conftest import (CASES, SHAPES, assert_optimizers_match, clone_params, forbid_host_sync,
                      make_params, set_grads)
from fused_adam import FusedAdamW

STEPS = 10


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("max_norm", [0.5, 1e6])  # clipping every step / never
def test_matches_clip_grad_norm_then_adamw(device, backend, max_norm):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, max_grad_norm=max_norm, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    for step in range(STEPS):
        set_grads(params, ref_params, step, skip={1} if step % 3 == 0 else set())
        torch.nn.utils.clip_grad_norm_([p for p in ref_params if p.grad is not None], max_norm)
        ours.step()
        ref.step()
    # the norm sums in another order than clip_grad_norm_'s per-tensor norms: the coefficient
    # may differ in its last bit, so this is the kernels' tolerance, not bit equality
    assert_optimizers_match(ours, ref, backend)


def test_clipping_needs_no_host_sync(monkeypatch):
    params = make_params(SHAPES, "cpu")
    opt = FusedAdamW(params, max_grad_norm=0.1)
    set_grads(params, clone_params(params), 0)
    opt.step()  # state creation may read values; the steady-state step below must not

    # without skip_nonfinite/capturable the step counts are CPU tensors, read with tolist():
    # host memory, no device sync
    forbid_host_sync(monkeypatch, names=("item", "__bool__", "__float__"))
    opt.step()


def test_invalid_max_grad_norm():
    with pytest.raises(ValueError, match="Invalid max_grad_norm value: 0"):
        FusedAdamW([torch.nn.Parameter(torch.randn(2))], max_grad_norm=0)
