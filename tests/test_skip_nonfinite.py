"""skip_nonfinite and GradScaler's in-kernel protocol: a step with an inf/NaN grad leaves every
param and state bit-identical and does not count, decided on the device with no host sync."""
import pytest
import torch

from conftest import (CASES, SHAPES, assert_close, assert_optimizers_match, clone_params,
                      forbid_host_sync, make_params, set_grads)
from fused_adam import FusedAdamW


def _snapshot(opt):
    params = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    state = {id(p): {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}
    return params, state


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_nonfinite_step_changes_nothing(device, backend, bad):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, amsgrad=True, skip_nonfinite=True, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, amsgrad=True, foreach=False)
    for step in range(6):
        set_grads(params, ref_params, step, skip={2} if step == 1 else set())
        if step == 3:
            params[4].grad.view(-1)[5] = bad  # the reference simply does not step
            before = _snapshot(ours)
            ours.step()
            after = _snapshot(ours)
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0]))
            assert all(torch.equal(before[1][k][n], after[1][k][n]) for k in before[1] for n in before[1][k])
            continue
        ours.step()
        ref.step()
    assert float(ours.skipped_steps) == 1.0
    assert ours.state[params[0]]["step"].device.type == device  # on the device, like torch fused
    assert_optimizers_match(ours, ref, backend)


def test_no_host_sync_in_the_step(monkeypatch):
    params = make_params(SHAPES, "cpu")
    opt = FusedAdamW(params, skip_nonfinite=True, max_grad_norm=1.0)
    set_grads(params, clone_params(params), 0)
    opt.step()

    forbid_host_sync(monkeypatch)
    params[0].grad.fill_(float("inf"))
    opt.step()
    opt.step()


@pytest.mark.parametrize("device,backend", CASES)
def test_grad_scaler_in_kernel(device, backend):
    """With skip_nonfinite the GradScaler hands over grad_scale and found_inf: the unscale and the
    skip happen in the kernel; results match torch.optim.AdamW driven by the same scaler."""
    torch.manual_seed(0)
    model, ref_model = torch.nn.Linear(8, 4).to(device), torch.nn.Linear(8, 4).to(device)
    ref_model.load_state_dict(model.state_dict())
    opt = FusedAdamW(model.parameters(), lr=1e-2, skip_nonfinite=True, backend=backend)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    assert opt._step_supports_amp_scaling
    scalers = [torch.amp.GradScaler(device, init_scale=1024.0) for _ in range(2)]
    x = torch.randn(16, 8, device=device)
    for step in range(4):
        for m, o, s in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if step == 2:
                m.weight.grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 512.0
    assert float(opt.skipped_steps) == 1.0 and float(opt.state[model.weight]["step"]) == 3.0
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_protocol_needs_no_host_sync(monkeypatch):
    """What GradScaler.step does around our step(): set grad_scale and found_inf, call step."""
    params = make_params(SHAPES, "cpu")
    opt = FusedAdamW(params)
    for step, found in enumerate((0.0, 1.0, 0.0)):
        set_grads(params, clone_params(params), step)
        opt.grad_scale, opt.found_inf = torch.tensor(1024.0), torch.tensor(found)
        if step == 1:  # the first call re-packed with device step counts; from here: no sync
            forbid_host_sync(monkeypatch)
        opt.step()
        del opt.grad_scale, opt.found_inf
    monkeypatch.undo()
    assert float(opt.skipped_steps) == 1.0 and float(opt.state[params[0]]["step"]) == 2.0


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("bad_group", [0, 1])
def test_only_groups_with_skip_nonfinite_skip(device, backend, bad_group):
    """skip_nonfinite on group 1 only: a non-finite grad there (from the first step on) skips
    group 1 alone while group 0 steps as torch's; one in group 0 (no skip_nonfinite) goes into
    group 0's params as torch's does, and group 1 steps."""
    params = make_params([(7,), (3, 5), (11,), (4,)], device)
    ref_params = clone_params(params)
    ours = FusedAdamW([dict(params=params[:2]), dict(params=params[2:], skip_nonfinite=True)],
                      lr=1e-2, backend=backend)
    ref = torch.optim.AdamW([dict(params=ref_params[:2]), dict(params=ref_params[2:])], lr=1e-2,
                            foreach=False)
    for step in range(3):
        set_grads(params, ref_params, step)
        if step == 0:
            for ps in (params, ref_params):
                ps[2 * bad_group].grad[1] = float("nan")
        ours.step()
        if bad_group == 1 and step == 0:  # the reference steps only group 0
            ref.param_groups[1]["lr"], saved = 0.0, ref.param_groups[1]["lr"]
            kept = [p.detach().clone() for p in ref_params[2:]]
            ref.step()
            for p, k in zip(ref_params[2:], kept):
                p.data.copy_(k)
                ref.state.pop(p)
            ref.param_groups[1]["lr"] = saved
            continue
        ref.step()
    if bad_group == 0:
        assert params[0].isnan().any() and float(ours.skipped_steps) == 0.0
        params, ref_params = params[1:], ref_params[1:]  # (NaN != NaN)
    else:
        assert float(ours.skipped_steps) == 1.0
    for p, q in zip(params, ref_params):
        assert_close(p.detach(), q.detach(), backend, "param")
        assert float(ours.state[p]["step"]) == float(ref.state[q]["step"])
        for key in ref.state[q]:
            if key != "step":
                assert_close(ours.state[p][key], ref.state[q][key], backend, key)


def test_state_cleared_with_device_step_counts_keeps_one_row(monkeypatch):
    """Params whose states were adopted together with one step count (`opt.state.clear()`)
    share a hyperparameter row: not one row per param for the rest of the run."""
    from fused_adam.functional import Launch
    params = make_params([(3,)] * 50, "cpu")
    opt = FusedAdamW(params, skip_nonfinite=True)
    set_grads(params, clone_params(params), 0)
    opt.step()
    opt.state.clear()
    rows, run = [], Launch.run
    monkeypatch.setattr(Launch, "run", lambda self, found_inf=None: (
        rows.append(len(self.rows)), run(self, found_inf))[1])
    opt.step()
    opt.step()
    assert rows == [1, 1] and float(opt.state[params[0]]["step"]) == 2.0


def test_a_compiled_step_counts_its_skipped_steps():
    """`skipped_steps` under `torch.compile(opt.step)`: the count is a tensor the step adds to
    in place (an attribute set inside the compiled step was lost: it stayed 0)."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    p = torch.nn.Parameter(torch.randn(10))
    opt = FusedAdamW([p], lr=torch.tensor(0.01), capturable=True, skip_nonfinite=True)
    step = torch.compile(opt.step, fullgraph=True, backend=CompileCounter())
    for t in range(4):
        p.grad = torch.randn(10) if t % 2 else torch.full((10,), float("nan"))
        step()
    assert float(opt.skipped_steps) == 2.0 and float(opt.state[p]["step"]) == 2.0
