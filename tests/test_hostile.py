"""What user code and other libraries do around the optimizer, against torch.optim.AdamW on the
same inputs: options and checkpoints, bad values, duplicate params, the GradScaler protocol."""
import copy

import pytest
import torch

from conftest import assert_close, assert_optimizers_match, clone_params, make_params, set_grads
from fused_adam import FusedAdam, FusedAdamW

SHAPES = [(4, 3), (5,), ()]


def _pair(**kwargs):
    params = make_params(SHAPES, "cpu")
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, backend="torch", **kwargs)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    return params, ref_params, ours, ref


def _steps(params, ref_params, ours, ref, steps=3, start=0):
    for step in range(start, start + steps):
        set_grads(params, ref_params, step)
        ours.step()
        ref.step()


def test_a_torch_checkpoint_keeps_our_options():
    params, ref_params, ours, ref = _pair(max_grad_norm=0.5, bias_correction=False, seed=3)
    _steps(params, ref_params, ours, ref)
    ours.load_state_dict(ref.state_dict())
    group = ours.param_groups[0]
    assert (group["max_grad_norm"], group["bias_correction"], group["seed"]) == (0.5, False, 3)
    assert group["backend"] == "torch"


def test_our_options_in_a_checkpoint_win_over_the_constructor():
    params, _, ours, _ = _pair(max_grad_norm=0.5)
    state = ours.state_dict()
    other = FusedAdamW(clone_params(params), max_grad_norm=2.0)
    other.load_state_dict(state)
    assert other.param_groups[0]["max_grad_norm"] == 0.5


@pytest.mark.parametrize("breakage", ["short exp_avg", "0-dim exp_avg_sq", "no exp_avg",
                                      "bad shape", "not a tensor"])
def test_a_bad_checkpoint_raises_before_anything_changes(breakage):
    params, ref_params, ours, ref = _pair()
    _steps(params, ref_params, ours, ref)
    state = copy.deepcopy(ref.state_dict())  # its per-param dicts are ref's own
    s0 = state["state"][0]
    if breakage == "short exp_avg":
        s0["exp_avg"] = s0["exp_avg"][0]  # (3,) for a (4, 3) param: broadcastable
    elif breakage == "0-dim exp_avg_sq":
        s0["exp_avg_sq"] = s0["exp_avg_sq"].sum()
    elif breakage == "no exp_avg":
        del s0["exp_avg"]
    elif breakage == "bad shape":
        s0["exp_avg"] = torch.zeros(7)
    else:
        s0["exp_avg"] = 0.0
    before = {k: v.clone() for k, v in ours.state[params[0]].items()}
    with pytest.raises(ValueError, match="parameter 0"):
        ours.load_state_dict(state)
    for key, value in ours.state[params[0]].items():
        assert torch.equal(value, before[key])
    _steps(params, ref_params, ours, ref, start=3)  # and it still steps, as torch's does
    assert_optimizers_match(ours, ref, "torch")


def test_tensor_betas_are_read_at_each_step():
    beta1, beta2 = torch.tensor(0.9), torch.tensor(0.999)
    params = make_params(SHAPES, "cpu")
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, betas=(beta1, beta2), backend="torch")
    # The same (fp32) values as floats: ours reads them as the float of the tensor.
    ref = torch.optim.AdamW(ref_params, lr=1e-2, betas=(float(beta1), float(beta2)), foreach=False)
    _steps(params, ref_params, ours, ref, steps=1)
    assert ours.param_groups[0]["betas"][0] is beta1
    beta1.fill_(0.5)
    ref.param_groups[0]["betas"] = (0.5, float(beta2))
    _steps(params, ref_params, ours, ref, steps=2, start=1)
    assert_optimizers_match(ours, ref, "torch")


@pytest.mark.parametrize("bad", [dict(backend="no-such"), dict(state_dtype=torch.int32),
                                 dict(lr=-1.0), dict(max_grad_norm=0.0),
                                 dict(params=[torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))],
                                      state_dtype=torch.bfloat16)])
def test_add_param_group_checks_before_it_adds(bad):
    params, ref_params, ours, ref = _pair()
    group = dict(params=[torch.nn.Parameter(torch.randn(3))]) | bad
    with pytest.raises((ValueError, RuntimeError)):
        ours.add_param_group(group)
    assert len(ours.param_groups) == 1
    _steps(params, ref_params, ours, ref)
    assert_optimizers_match(ours, ref, "torch")


def test_a_bad_value_in_a_later_group_changes_nothing():
    params = make_params(SHAPES, "cpu")
    ours = FusedAdamW([dict(params=params[:1]), dict(params=params[1:])], lr=1e-2)
    set_grads(params, clone_params(params), 0)
    ours.step()
    before = [p.detach().clone() for p in params]
    steps = [float(ours.state[p]["step"]) for p in params]
    ours.param_groups[1]["lr"] = None
    with pytest.raises(TypeError, match="lr"):
        ours.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [float(ours.state[p]["step"]) for p in params] == steps


def test_a_param_twice_in_a_group_warns_as_torch_and_steps_once():
    params = make_params(SHAPES, "cpu")
    ref_params = clone_params(params)
    with pytest.warns(UserWarning, match="duplicate parameters"):
        ours = FusedAdamW([params[0], *params], lr=1e-2, backend="torch")
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    _steps(params, ref_params, ours, ref)
    for p, q in zip(params, ref_params):  # as if listed once
        assert_close(p.detach(), q.detach(), "torch", "param")
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert_close(ours.state[p][key], ref.state[q][key], "torch", key)
    assert len(ours.state_dict()["state"]) == len(params)


def test_the_grad_scaler_protocol_is_advertised_only_with_skip_nonfinite():
    """Lightning refuses gradient clipping for an optimizer that advertises it (bf16-mixed
    too), and accelerate's step_was_skipped relies on the scaler skipping step() itself."""
    params = make_params(SHAPES, "cpu")
    assert not FusedAdamW(params)._step_supports_amp_scaling
    assert FusedAdam(clone_params(params), skip_nonfinite=True)._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = FusedAdamW(params)
    calls = []
    original = opt.step
    opt.step = lambda *a, **k: calls.append(1) or original(*a, **k)
    scaler.scale(sum(p.sum() for p in params)).backward()
    params[0].grad[0, 0] = float("inf")
    scaler.step(opt)  # an overflow: the scaler skips step(), which is how accelerate sees it
    scaler.update()
    assert calls == [] and scaler.get_scale() == 512.0
