"""LR schedulers, clip_grad_norm_, optimizer hooks, torch.compile and the Hugging Face Trainer with
our optimizer, each against torch.optim.AdamW doing the same."""
import pytest
import torch
from torch import nn

import fused_adam
from conftest import CASES, TOLERANCE

STEPS = 8


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 3))


def _data():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(5, 6, generator=gen) for _ in range(STEPS)]


def _assert_close(model, ref, backend):
    """Params of `model` against `ref`'s (modules, or tensors as they are)."""
    params = lambda m: m.parameters() if isinstance(m, nn.Module) else [m]  # noqa: E731
    for a, b in zip(params(model), params(ref), strict=True):
        if backend == "torch":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, **TOLERANCE[(backend, "training loop")])


SCHEDULERS = {
    "StepLR": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "OneCycleLR": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=STEPS),
    "LambdaLR": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1 / (1 + s)),
    "CosineAnnealingLR": lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=STEPS),
}


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("name", SCHEDULERS)
def test_schedulers_and_clip_grad_norm_match_torch(name, device, backend):
    """The scheduler drives lr (OneCycleLR also betas[0]); clip_grad_norm_ rewrites our grad
    views in place before each step."""
    runs = {}
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.01),
                 lambda ps: fused_adam.FusedAdamW(ps, lr=0.01, backend=backend)):
        model = _model()
        opt = make(model.parameters())
        sched = SCHEDULERS[name](opt)
        lrs = []
        for x in _data():
            opt.zero_grad()
            (model(x) ** 2).mean().mul(50).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
            opt.step()
            sched.step()
            lrs.append((opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]))
        runs[type(opt)] = model, lrs, sched.state_dict()
    (ref, ref_lrs, ref_sched), (ours, lrs, sched_state) = runs.values()
    assert lrs == ref_lrs and len(set(lrs)) > 1
    assert sched_state == ref_sched
    _assert_close(ours, ref, backend)


def test_step_and_state_dict_hooks_run_as_in_torch():
    model = _model()
    opt = fused_adam.FusedAdamW(model.parameters(), lr=0.01)
    calls = []
    opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o.state_dict()["state"] == {})))
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", len(o.state))))
    opt.register_state_dict_pre_hook(lambda o: calls.append(("sd pre",)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    model(torch.randn(2, 6)).sum().backward()
    opt.step()
    assert calls == [("sd pre",), ("pre", True), ("post", 4)]  # the pre-hook called state_dict()
    saved = opt.state_dict()
    assert saved["extra"] == 1
    # A load pre-hook may rewrite the dict (here: halve exp_avg); a post-hook sees the result.
    fresh = fused_adam.FusedAdamW(_model().parameters(), lr=0.01)

    def halve(o, sd):
        sd = dict(sd, state={k: dict(v, exp_avg=v["exp_avg"] / 2) for k, v in sd["state"].items()})
        sd.pop("extra")
        return sd
    fresh.register_load_state_dict_pre_hook(halve)
    posts = []
    fresh.register_load_state_dict_post_hook(lambda o: posts.append(len(o.state)))
    fresh.load_state_dict(saved)
    assert posts == [4]
    for p, q in zip(fresh.param_groups[0]["params"], opt.param_groups[0]["params"]):
        torch.testing.assert_close(fresh.state[p]["exp_avg"], opt.state[q]["exp_avg"] / 2)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
def test_zero_grad_and_add_param_group_as_in_torch(device, backend):
    runs = []
    for make in (lambda ps, **kw: torch.optim.AdamW(ps, **kw),
                 lambda ps, **kw: fused_adam.FusedAdamW(ps, backend=backend, **kw)):
        model, extra = _model(), _model(1)
        opt = make(model.parameters(), lr=0.01)
        for i, x in enumerate(_data()):
            if i == 3:
                opt.add_param_group({"params": extra.parameters(), "lr": 0.02, "weight_decay": 0.1})
            opt.zero_grad(set_to_none=i % 2 == 0)
            grads = [p.grad for g in opt.param_groups for p in g["params"]]
            if i % 2 == 0:
                assert all(g is None for g in grads)
            else:
                assert all(g is None or not g.any() for g in grads)
                assert any(g is not None for g in grads)
            (model(x).sum() + (extra(x).sum() if i >= 3 else 0)).backward()
            opt.step()
        runs.append((model, extra))
    (ref, ref_extra), (ours, ours_extra) = runs
    _assert_close(ours, ref, backend)
    _assert_close(ours_extra, ref_extra, backend)


def _fsdp1_like_training(make_optimizer):
    """One rank of FSDP1 (torch/distributed/fsdp/_flat_param.py), as it treats a FlatParameter
    every iteration: before forward `flat.data` becomes the all-gather of the current
    `flat.data`, after backward it is reset to the local shard FSDP1 allocated
    (`flat.data = flat._local_shard`). An optimizer that re-points `flat.data` is undone there."""
    torch.manual_seed(0)
    flat = nn.Parameter(torch.randn(6 * 3 + 3))
    local_shard = flat.data
    opt = make_optimizer([flat])
    for x in _data():
        opt.zero_grad()
        flat.data = flat.data.clone()  # unshard: the all-gather output
        torch.tanh(x @ flat[:18].view(3, 6).T + flat[18:]).sum().backward()
        flat.data = local_shard  # reshard
        opt.step()
    return flat.detach()


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
def test_fsdp1_style_flat_param_is_stepped_in_its_own_storage(device, backend):
    ref = _fsdp1_like_training(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    ours = _fsdp1_like_training(lambda ps: fused_adam.FusedAdamW(ps, lr=0.01, backend=backend))
    _assert_close(ours, ref, backend)


@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
def test_params_that_view_a_foreign_buffer_are_updated_in_it(device, backend):
    """A contiguous-parameter engine (Megatron-style, or ZeroRedundancyOptimizer's buckets) owns
    one buffer and reads or communicates it, not the params: the update must land there."""
    runs = []
    for make in (lambda ps: torch.optim.AdamW(ps, lr=0.01),
                 lambda ps: fused_adam.FusedAdamW(ps, lr=0.01, backend=backend)):
        torch.manual_seed(0)
        engine_buffer = torch.randn(6 * 3 + 3)
        weight = nn.Parameter(engine_buffer[:18].view(3, 6))
        bias = nn.Parameter(engine_buffer[18:])
        opt = make([weight, bias])
        for x in _data():
            opt.zero_grad()
            torch.tanh(x @ weight.T + bias).sum().backward()
            opt.step()
        assert weight.data_ptr() == engine_buffer.data_ptr()
        runs.append(engine_buffer)
    ref, ours = runs
    _assert_close(ours, ref, backend)


def test_compiled_model_trains_with_our_optimizer():
    runs = []
    for make in (torch.optim.AdamW, fused_adam.FusedAdamW):
        model = _model()
        compiled = torch.compile(model)
        opt = make(model.parameters(), lr=0.01)
        for x in _data():
            opt.zero_grad()
            compiled(x).pow(2).mean().backward()
            opt.step()
        runs.append(model)
    _assert_close(runs[1], runs[0], fused_adam.available_backends("cpu")[-1])


# The scheduler never sees the compiled step (it bypasses its wrapper) and warns once.
@pytest.mark.filterwarnings("ignore:Detected call of")
@pytest.mark.parametrize("device,backend", [c for c in CASES if c.values[0] == "cpu"])
@pytest.mark.parametrize("name", ["StepLR", "LambdaLR", "CosineAnnealingLR", "OneCycleLR"])
def test_compiled_step_has_no_graph_break_and_no_recompile_when_lr_changes(name, device, backend):
    """fullgraph=True fails on any graph break; the counter counts compiled frames: one for the
    first step (state creation), one for the steady state, none when the scheduler moves lr."""
    from torch._dynamo.testing import CompileCounter
    torch._dynamo.reset()
    model, ref = _model(), _model()
    opt = fused_adam.FusedAdamW(model.parameters(), lr=torch.tensor(0.01), capturable=True,
                                backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01)
    kw = {"cycle_momentum": False} if name == "OneCycleLR" else {}
    make = SCHEDULERS[name] if not kw else (lambda o: torch.optim.lr_scheduler.OneCycleLR(
        o, max_lr=0.05, total_steps=STEPS, **kw))
    counter = CompileCounter()
    # Compiled before the scheduler wraps opt.step: torch._dynamo skips lr_scheduler.py, so its
    # wrapper would be a graph break (for torch.optim's optimizers too).
    step = torch.compile(opt.step, backend=counter, fullgraph=True)
    sched, ref_sched = make(opt), make(ref_opt)
    frames = []
    for x in _data():
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=False)
            m(x).pow(2).mean().backward()
        step()
        ref_opt.step()
        sched.step()
        ref_sched.step()
        frames.append(counter.frame_count)
    assert frames[1:] == [2] * (STEPS - 1), frames
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(ref_opt.param_groups[0]["lr"])
    # Capturable scalars (bias corrections on the device) round differently from torch's
    # host-side ones, so even the torch backend is compared at the kernels' tolerance.
    _assert_close(model, ref, "cpu")


def test_our_kernel_is_a_custom_op_in_the_compiled_graph():
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not built")
    graphs = []

    def record(gm, inputs):
        graphs.append(gm)
        return gm.forward
    torch._dynamo.reset()
    model = _model()
    opt = fused_adam.FusedAdamW(model.parameters(), lr=torch.tensor(0.01), capturable=True)
    model(torch.randn(2, 6)).sum().backward()
    opt.step()  # state created eagerly
    torch.compile(opt.step, backend=record, fullgraph=True)()
    targets = [str(n.target) for n in graphs[-1].graph.nodes if n.op == "call_function"]
    assert "fused_adam.adam_step_.default" in targets or "fused_adam.adam_step_" in targets, targets


@pytest.mark.parametrize("solo", [False, True], ids=["packed", "own storage"])
def test_compiled_step_with_inductor_matches_eager(solo, monkeypatch):
    if solo:  # every param stepped in its own storage, as params of 4M+ elements are
        monkeypatch.setattr(fused_adam.flat, "SOLO_NUMEL", 1)
    torch._dynamo.reset()
    runs = []
    for compiled in (False, True):
        model = _model()
        opt = fused_adam.FusedAdamW(model.parameters(), lr=torch.tensor(0.01), capturable=True)
        step = torch.compile(opt.step) if compiled else opt.step
        for x in _data()[:3]:
            opt.zero_grad(set_to_none=False)
            model(x).pow(2).mean().backward()
            step()
        runs.append(model)
    for a, b in zip(runs[0].parameters(), runs[1].parameters()):
        assert torch.equal(a, b)


def _trainer_losses(make_optimizer, out, resume=None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)  # built from a config: no download
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (48, 16), generator=gen)]
    args = transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=6, learning_rate=1e-3,
        logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(make_optimizer(model.parameters()), None))
    trainer.train(resume_from_checkpoint=resume)
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_hugging_face_trainer_trains_saves_and_resumes(tmp_path):
    reference = _trainer_losses(lambda ps: torch.optim.AdamW(ps, lr=1e-3), tmp_path / "torch")
    ours = _trainer_losses(lambda ps: fused_adam.FusedAdamW(ps, lr=1e-3), tmp_path / "ours")
    assert ours == pytest.approx(reference, rel=1e-5) and len(ours) == 6
    # Resume from step 3: the Trainer reloads model, our optimizer's state_dict and the scheduler,
    # and steps 4-6 retrace the uninterrupted run exactly.
    resumed = _trainer_losses(lambda ps: fused_adam.FusedAdamW(ps, lr=1e-3), tmp_path / "resumed",
                              resume=tmp_path / "ours" / "checkpoint-3")
    assert resumed[-3:] == ours[-3:]
