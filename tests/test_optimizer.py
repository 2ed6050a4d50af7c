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
    assert len(opt._packing.buffers) == 1  # one buffer for every group: one layout
    assert_optimizers_match(opt, ref, backend)


@pytest.mark.parametrize("device,backend", CASES)
def test_groups_in_one_buffer_clip_each_their_own_grads(device, backend):
    """Groups sharing a buffer, each with its own max_grad_norm (or none): each group's grads
    clipped by their own norm, as clip_grad_norm_ on that group's params before AdamW."""
    shapes = [(5, 7), (13,), (3,), (40,), (2, 2), (9,)]
    params = make_params(shapes, device)
    ref_params = clone_params(params)
    norms = [0.05, None, 1e-3]

    def groups(ps, ours):
        return [dict(params=ps[2 * i:2 * i + 2], lr=1e-2 * (i + 1),
                     **({"max_grad_norm": n} if ours else {})) for i, n in enumerate(norms)]
    opt = FusedAdamW(groups(params, True), backend=backend)
    ref = torch.optim.AdamW(groups(ref_params, False), foreach=False)
    assert len(opt._packing.buffers) == 1
    for step in range(4):
        set_grads(params, ref_params, step)
        for group, norm in zip(ref.param_groups, norms):
            if norm is not None:
                torch.nn.utils.clip_grad_norm_(group["params"], norm)
        opt.step()
        ref.step()
    assert_optimizers_match(opt, ref, backend)


def test_changed_group_rebuilds_only_the_buffers_that_hold_its_params():
    """A group added later gets buffers of its own (the others are kept, not copied); a frozen
    param of one group that gets a grad, or a group popped, rebuilds the buffer its group shares
    with others; every param and state goes on as torch's."""
    params = make_params([(4, 3), (7,), (5,), (6,), (8,)], "cpu")
    ref_params = clone_params(params)
    for p in (params[1], ref_params[1]):
        p.requires_grad_(False)

    def groups(ps):
        return [dict(params=ps[0:2], lr=1e-2), dict(params=ps[2:3], lr=2e-2, weight_decay=0.1)]
    opt, ref = FusedAdamW(groups(params)), torch.optim.AdamW(groups(ref_params), foreach=False)
    live = [0, 2]  # params that get grads

    def steps(n, base):
        for step in range(base, base + n):
            set_grads(params, ref_params, step, skip=set(range(5)) - set(live))
            opt.step()
            ref.step()
    steps(2, 0)
    (shared,) = opt._packing.buffers
    for o, ps in ((opt, params), (ref, ref_params)):
        o.add_param_group(dict(params=ps[3:5], lr=3e-2, betas=(0.8, 0.99)))
    live += [3, 4]
    steps(2, 2)
    assert shared in opt._packing.buffers and len(opt._packing.buffers) == 2
    for p in (params[1], ref_params[1]):  # unfrozen: its group's buffer (shared) is rebuilt
        p.requires_grad_(True)
    live.append(1)
    steps(2, 4)
    assert shared not in opt._packing.buffers
    assert_optimizers_match(opt, ref, "cpu")
    for o in (opt, ref):
        o.param_groups.pop()
    steps(2, 6)
    assert_optimizers_match(opt, ref, "cpu")


@pytest.mark.parametrize("device,backend", CASES)
def test_groups_that_round_differently_share_a_buffer(device, backend):
    """bf16 groups in one buffer, one with stochastic rounding and one without: each group's
    params as an optimizer of that group alone makes them, bit for bit (the first group's
    random bits keyed on the same element indices)."""
    from conftest import skip_if_interpreted_bf16
    skip_if_interpreted_bf16(device, backend, [torch.bfloat16])
    shapes = [(33,), (5, 4), (17,)]
    both = make_params(shapes, device, dtype=torch.bfloat16)
    alone = clone_params(both)
    options = [dict(stochastic_rounding=True, seed=3, lr=1e-2), dict(lr=3e-2)]
    opt = FusedAdamW([dict(params=both[:2], **options[0]), dict(params=both[2:], **options[1])],
                     backend=backend)
    solo = [FusedAdamW(alone[:2], backend=backend, **options[0]),
            FusedAdamW(alone[2:], backend=backend, **options[1])]
    assert len(opt._packing.buffers) == 1
    for step in range(3):
        set_grads(both, alone, step)
        opt.step()
        for o in solo:
            o.step()
    for p, q in zip(both, alone):
        assert torch.equal(p, q)
        for key in opt.state[p]:
            assert torch.equal(opt.state[p][key], [o for o in solo if q in o.state][0].state[q][key])


def test_launch_rows_follow_each_groups_options():
    """Spans of different groups with equal step counts get each their group's row (rows were
    once keyed by the id of a per-group dict already freed: a group took another's lr, seen on
    an H100)."""
    from fused_adam.backends import resolve
    from fused_adam.functional import Launch
    fn = resolve("torch", torch.device("cpu"), torch.float32)
    buffers = [[torch.ones(16), torch.ones(16), torch.zeros(16), torch.zeros(16), None, None]
               for _ in range(6)]
    launch = Launch(fn, stochastic=False)
    options_of = [{"lr": 2.0**-i, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8} for i in range(6)]
    for i, operands in enumerate(buffers):
        launch.add(operands, [(0, 16, 1.0, 0, 1.0, i)], options_of, [None] * 6)
    launch.run()
    updates = [1 - b[0][0].item() for b in buffers]  # Adam's first step moves by ~lr
    assert updates == pytest.approx([2.0**-i for i in range(6)], rel=1e-3), updates


def test_params_that_leave_keep_no_buffer_alive():
    """A popped group's params (still in the model, their states kept as torch keeps them) get
    storages of their own: the buffer they shared with other groups is freed, values kept."""
    import gc
    import weakref
    params = make_params([(50,), (60,), (7,)], "cpu")
    ref_params = clone_params(params)
    opt = FusedAdamW([dict(params=params[:2]), dict(params=params[2:], lr=0.1)])
    ref = torch.optim.AdamW([dict(params=ref_params[:2]), dict(params=ref_params[2:], lr=0.1)],
                            foreach=False)
    set_grads(params, ref_params, 0)
    opt.step()
    ref.step()
    (buf,) = opt._packing.buffers
    flats = [weakref.ref(t) for t in (buf.param, buf.grad, *buf.state.values())]
    for o in (opt, ref):
        o.param_groups.pop()
    set_grads(params[:2], ref_params[:2], 1)
    opt.step()
    ref.step()
    del buf
    gc.collect()
    assert all(f() is None for f in flats)
    assert_optimizers_match(opt, ref, "cpu")
    q, r = params[2], ref_params[2]
    assert torch.equal(q, r) and torch.equal(opt.state[q]["exp_avg"], ref.state[r]["exp_avg"])
    assert float(opt.state[q]["step"]) == 1.0 and torch.equal(q.grad, r.grad)
