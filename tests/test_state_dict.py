"""state_dict in torch's layout: checkpoints move both ways between torch.optim and ours."""
import copy
import io

import pytest
import torch

from conftest import CASES, SHAPES, assert_optimizers_match, clone_params, make_params, set_grads
from fused_adam import FusedAdam, FusedAdamW


def _steps(opts_and_params, first, count, skip=()):
    for step in range(first, first + count):
        params = [ps for _, ps in opts_and_params]
        set_grads(params[0], params[1], step, skip)
        for opt, _ in opts_and_params:
            opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_torch_checkpoint_loads_into_ours(device, backend, amsgrad):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, amsgrad=amsgrad, foreach=False)
    ours = FusedAdamW(params, lr=1e-2, amsgrad=amsgrad, backend=backend)
    _steps([(ref, ref_params), (torch.optim.AdamW(params, amsgrad=amsgrad), params)], 0, 5, skip={1})
    with torch.no_grad():
        for p, q in zip(params, ref_params):
            p.copy_(q)
    ours.load_state_dict(_roundtrip(ref.state_dict()))
    assert ours.param_groups[0]["backend"] == backend and ours.param_groups[0]["bias_correction"]
    _steps([(ours, params), (ref, ref_params)], 5, 5)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_our_checkpoint_loads_into_torch(device, backend):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdam(params, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.Adam(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    _steps([(ours, params), (ref, ref_params)], 0, 5, skip={2})
    sd = _roundtrip(ours.state_dict())
    assert set(sd["state"]) == set(ref.state_dict()["state"])
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
    assert sd["state"][0]["step"].dtype == torch.float32 and sd["state"][0]["step"].dim() == 0
    fresh = torch.optim.Adam(ref_params, lr=1.0, weight_decay=0.1, foreach=False)
    fresh.load_state_dict(sd)
    _steps([(ours, params), (fresh, ref_params)], 5, 5)
    assert_optimizers_match(ours, fresh, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_save_load_resumes_bit_identically(device, backend):
    params = make_params(SHAPES, device)
    ours = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    _steps([(ours, params), (torch.optim.SGD(clone_params(params), lr=0), clone_params(params))], 0, 4)
    checkpoint = _roundtrip({"params": [p.detach().clone() for p in params], "opt": ours.state_dict()})
    resumed_params = [p.clone().requires_grad_() for p in checkpoint["params"]]
    resumed = FusedAdamW(resumed_params, lr=0.5, backend=backend)  # lr comes from the checkpoint
    resumed.load_state_dict(checkpoint["opt"])
    _steps([(ours, params), (resumed, resumed_params)], 4, 6)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
        for key, value in ours.state[p].items():
            assert torch.equal(value, resumed.state[q][key]), key


def test_load_state_dict_copies_instead_of_aliasing():
    params = make_params([(8,)], "cpu")
    ours = FusedAdam(params)
    _steps([(ours, params), (torch.optim.SGD(clone_params(params), lr=0), clone_params(params))], 0, 2)
    other_params = clone_params(params)
    other = FusedAdam(other_params)
    sd = copy.deepcopy(ours.state_dict())
    other.load_state_dict(sd)
    _steps([(other, other_params), (torch.optim.SGD(clone_params(params), lr=0), clone_params(params))], 2, 1)
    assert float(sd["state"][0]["step"]) == 2.0 and float(other.state[other_params[0]]["step"]) == 3.0
