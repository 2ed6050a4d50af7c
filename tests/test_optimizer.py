"""FusedAdam/FusedAdamW against torch.optim.Adam/AdamW (foreach=False), every backend here."""
import pytest
import torch

from conftest import (CASES, INTERPRET, SHAPES, assert_optimizers_match, clone_params,
                      make_params, set_grads)
from fused_adam import FusedAdam, FusedAdamW

PAIRS = [pytest.param(FusedAdam, torch.optim.Adam, id="Adam"),
         pytest.param(FusedAdamW, torch.optim.AdamW, id="AdamW")]
OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param(dict(lr=1e-2), id="lr1e-2"),
    pytest.param(dict(weight_decay=0.1), id="wd0.1"),
    pytest.param(dict(maximize=True, weight_decay=0.1), id="maximize"),
    pytest.param(dict(amsgrad=True, weight_decay=0.1), id="amsgrad"),
    pytest.param(dict(betas=(0.5, 0.9), eps=1e-6, lr=3e-3), id="betas"),
]
STEPS = 20


def run(ours, ref, ours_params, ref_params, steps=STEPS, skip=lambda step: ()):
    for step in range(steps):
        set_grads(ours_params, ref_params, step, skip(step))
        ours.step()
        ref.step()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("ours_cls,ref_cls", PAIRS)
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch(device, backend, ours_cls, ref_cls, options):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = ours_cls(params, backend=backend, **options)
    ref = ref_cls(ref_params, foreach=False, **options)
    run(ours, ref, params, ref_params)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.skipif(INTERPRET, reason="too large for the Triton interpreter")
@pytest.mark.parametrize("device,backend", CASES)
def test_large_tensor(device, backend):
    params = make_params([(1 << 20) + 3, (1000,)], device)
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, weight_decay=0.1, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, weight_decay=0.1, foreach=False)
    run(ours, ref, params, ref_params, steps=5)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_param_groups_with_different_hyperparameters(device, backend):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)

    def groups(ps):
        return [dict(params=ps[:2]),
                dict(params=ps[2:4], lr=1e-2, weight_decay=0.3, amsgrad=True),
                dict(params=ps[4:], betas=(0.8, 0.99), maximize=True, eps=1e-5)]

    ours = FusedAdamW(groups(params), lr=2e-3, backend=backend)
    ref = torch.optim.AdamW(groups(ref_params), lr=2e-3, foreach=False)
    run(ours, ref, params, ref_params)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_lr_scheduler(device, backend):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdam(params, lr=1e-2, backend=backend)
    ref = torch.optim.Adam(ref_params, lr=1e-2, foreach=False)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=STEPS) for o in (ours, ref)]
    for step in range(STEPS):
        set_grads(params, ref_params, step)
        ours.step()
        ref.step()
        for s in scheds:
            s.step()
    assert ours.param_groups[0]["lr"] == ref.param_groups[0]["lr"]
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_none_grads_are_skipped(device, backend, amsgrad):
    """A param whose grad is None in a step is not updated and its state is untouched; its step
    count then lags the others', so the buffer runs with several bias corrections."""
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdamW(params, amsgrad=amsgrad, backend=backend)
    ref = torch.optim.AdamW(ref_params, amsgrad=amsgrad, foreach=False)
    # param 0 never has a grad (no state at all), 2 joins at step 3, 3 and 5 skip some steps.
    skip = lambda step: {0} | ({2} if step < 3 else set()) | ({3} if step % 3 == 0 else set()) | (
        {5} if step % 4 == 1 else set())
    run(ours, ref, params, ref_params, skip=skip)
    assert 0 not in {id(p) for p in ours.state} and len(ours.state) == len(ref.state)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_add_param_group_after_steps(device, backend):
    params = make_params(SHAPES, device)
    ref_params = clone_params(params)
    ours = FusedAdam(params[:3], lr=1e-2, backend=backend)
    ref = torch.optim.Adam(ref_params[:3], lr=1e-2, foreach=False)
    run(ours, ref, params[:3], ref_params[:3], steps=5)
    ours.add_param_group(dict(params=params[3:], lr=3e-3, amsgrad=True))
    ref.add_param_group(dict(params=ref_params[3:], lr=3e-3, amsgrad=True))
    run(ours, ref, params, ref_params, steps=7)
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_complex_params(device, backend):
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(5, 7, dtype=torch.complex64, generator=gen).to(device).requires_grad_(),
              torch.randn(33, generator=gen).to(device).requires_grad_()]
    ref_params = clone_params(params)
    ours = FusedAdamW(params, lr=1e-2, amsgrad=True, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, amsgrad=True, foreach=False)
    run(ours, ref, params, ref_params, steps=5)
    assert params[0].is_complex() and ours.state[params[0]]["exp_avg"].is_complex()
    assert_optimizers_match(ours, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_channels_last_param_keeps_its_layout(device, backend):
    params = [torch.randn(4, 3, 5, 5).to(device, memory_format=torch.channels_last).requires_grad_()]
    ref_params = clone_params(params)
    ours = FusedAdamW(params, backend=backend)
    ref = torch.optim.AdamW(ref_params, foreach=False)
    run(ours, ref, params, ref_params, steps=3)
    assert params[0].is_contiguous(memory_format=torch.channels_last)
    assert ours.state[params[0]]["exp_avg"].stride() == ref.state[ref_params[0]]["exp_avg"].stride()
    assert_optimizers_match(ours, ref, backend)


def _reference_step(p, g, m, v, lr, beta1, beta2, eps):
    """Adam without bias correction, written from the paper's update in float64."""
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    p.sub_(lr * m / (v.sqrt() + eps))


@pytest.mark.parametrize("device,backend", CASES)
def test_bias_correction_false(device, backend):
    params = make_params(SHAPES, device)
    corrected = clone_params(params)
    ref = [p.detach().double() for p in params]
    moments = [(torch.zeros_like(r), torch.zeros_like(r)) for r in ref]
    ours = FusedAdam(params, lr=1e-2, bias_correction=False, backend=backend)
    with_bc = FusedAdam(corrected, lr=1e-2, backend=backend)
    for step in range(STEPS):
        set_grads(params, corrected, step)
        for p, r, (m, v) in zip(params, ref, moments):
            _reference_step(r, p.grad.double(), m, v, 1e-2, 0.9, 0.999, 1e-8)
        ours.step()
        with_bc.step()
    for p, r, (m, v) in zip(params, ref, moments):
        torch.testing.assert_close(p.detach().double(), r, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ours.state[p]["exp_avg"].double(), m, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(ours.state[p]["exp_avg_sq"].double(), v, rtol=1e-5, atol=1e-9)
    assert not torch.allclose(params[0], corrected[0], rtol=1e-3)  # the option changes the step


def test_closure_named_params_and_hooks():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    opt = FusedAdamW(model.named_parameters(), lr=1e-2)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append("pre"))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append("post"))
    x = torch.randn(8, 4)

    def closure():
        opt.zero_grad()
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach()

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0] and calls == ["pre", "post"] * 5
    sd = opt.state_dict()
    assert sd["param_groups"][0]["param_names"] == ["weight", "bias"]
    assert set(sd["state"]) == {0, 1} and float(sd["state"][0]["step"]) == 5.0


@pytest.mark.parametrize("device,backend", CASES)
def test_param_groups_share_one_launch(device, backend):
    """24 groups of different lr, betas, eps, weight decay and maximize (layer-wise decay), some
    params joining late: one backend call a step for all of them, each group as torch steps it."""
    from torch.profiler import profile
    gen = torch.Generator().manual_seed(0)
    shapes = [(int(n),) for n in torch.randint(1, 300, (72,), generator=gen)]
    params = make_params(shapes, device)
    ref_params = clone_params(params)

    def groups(ps):
        return [dict(params=ps[3 * i:3 * i + 3], lr=1e-2 * 0.9**i, betas=(0.9 - 0.01 * i, 0.999),
                     eps=10.0**-(6 + i % 3), weight_decay=0.02 * (i % 4), maximize=i % 5 == 0)
                for i in range(24)]
    opt = FusedAdamW(groups(params), backend=backend)
    ref = torch.optim.AdamW(groups(ref_params), foreach=False)
    for step in range(4):
        # the last group's params get grads from the third step on: other step counts
        set_grads(params, ref_params, step, skip=range(69, 72) if step < 2 else ())
        with profile() as prof:
            opt.step()
        ref.step()
        if backend == "cpu":  # (the torch backend loops over segments; Triton launches each)
            calls = [e.count for e in prof.key_averages() if e.key == "fused_adam::adam_step_"]
            assert calls == [1], calls
    assert_optimizers_match(opt, ref, backend)


def test_launch_rows_follow_each_groups_options():
    """Options built afresh per group (as step() builds them) get their own rows: a row keyed
    by the id of a dict already freed took the previous group's lr (seen on an H100)."""
    from fused_adam.backends import resolve
    from fused_adam.functional import Launch
    fn = resolve("torch", torch.device("cpu"), torch.float32)
    buffers = [[torch.ones(16), torch.ones(16), torch.zeros(16), torch.zeros(16), None, None]
               for _ in range(6)]
    launch = Launch(fn, stochastic=False)
    for i, operands in enumerate(buffers):
        options = {"lr": 2.0**-i, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
        launch.add(operands, [(0, 16, 1.0)], options)
        del options  # CPython's next dict takes its memory, and its id
    launch.run()
    updates = [1 - b[0][0].item() for b in buffers]  # Adam's first step moves by ~lr
    assert updates == pytest.approx([2.0**-i for i in range(6)], rel=1e-3), updates
