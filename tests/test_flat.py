"""Flat buffers: views, grads in every zero_grad style, storage replaced under the optimizer."""
import array

import pytest
import torch

from conftest import CASES, assert_close, skip_if_interpreted_bf16, assert_optimizers_match, clone_params, make_params, set_grads
import fused_adam
from fused_adam import FusedAdamW, _ext
from fused_adam.flat import ALIGN, DATA, GRADS, GRADS_AS_THEY_ARE, OBJECTS, addresses


def _model(device, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 33), torch.nn.ReLU(), torch.nn.Linear(33, 3),
                               torch.nn.LayerNorm(3)).to(device)


def _train(model, opt, steps, zero_grad, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 7, generator=gen).to(device)
        zero_grad(model, opt)
        model(x).square().mean().backward()
        opt.step()


ZERO_GRADS = {
    "opt.zero_grad()": lambda model, opt: opt.zero_grad(),
    "opt.zero_grad(set_to_none=False)": lambda model, opt: opt.zero_grad(set_to_none=False),
    "model.zero_grad()": lambda model, opt: model.zero_grad(),
}


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("zero_grad", list(ZERO_GRADS))
def test_training_loop_matches_torch(device, backend, zero_grad):
    model, ref_model = _model(device), _model(device)
    opt = FusedAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    _train(model, opt, 8, ZERO_GRADS[zero_grad], device=device)
    _train(ref_model, ref, 8, ZERO_GRADS[zero_grad], device=device)
    assert_optimizers_match(opt, ref, backend, "training loop")
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        assert_close(a, b, backend, k, "training loop")


def _own_storage(t):
    """t's storage holds just t's bytes (what safetensors, pickle and torch.save see)."""
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()


def test_params_grads_and_states_are_tensors_of_their_own_over_one_buffer():
    model = _model("cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = FusedAdamW(model.parameters())
    params = list(model.parameters())
    for k, v in model.state_dict().items():  # the model is unchanged
        assert torch.equal(v, before[k]), k
    _train(model, opt, 1, ZERO_GRADS["opt.zero_grad()"])
    # the kernel steps one buffer: consecutive, aligned segments of one allocation
    for tensors in ([p.detach() for p in params], [p.grad for p in params],
                    [opt.state[p]["exp_avg"] for p in params]):
        assert all(map(_own_storage, tensors))
        ptrs = [t.data_ptr() for t in tensors]
        sizes = [-(-t.numel() // ALIGN) * ALIGN * t.element_size() for t in tensors]
        assert all(b - a == size for a, b, size in zip(ptrs, ptrs[1:], sizes))
        assert all(ptr % (ALIGN * 4) == ptrs[0] % (ALIGN * 4) for ptr in ptrs)
    # after zero_grad(set_to_none=False) autograd accumulates straight into the grads
    grads = [p.grad for p in params]
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is g and not g.any() for p, g in zip(params, grads))
    model(torch.randn(4, 7)).sum().backward()
    assert all(p.grad is g and g.any() for p, g in zip(params, grads))


def test_zero_grad_set_to_none_gives_none():
    model = _model("cpu")
    opt = FusedAdamW(model.parameters())
    _train(model, opt, 2, ZERO_GRADS["opt.zero_grad()"])
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_assigned_grad_is_used():
    params = make_params([(10,), (3, 4)], "cpu")
    ref_params = clone_params(params)
    opt, ref = FusedAdamW(params), torch.optim.AdamW(ref_params, foreach=False)
    for step in range(4):
        set_grads(params, ref_params, step)  # assigns fresh tensors every step
        opt.step()
        ref.step()
    # and in-place writes into our grad views count too
    for p, q in zip(params, ref_params):
        p.grad.mul_(0.5)
        q.grad.mul_(0.5)
    opt.step()
    ref.step()
    assert_optimizers_match(opt, ref, "torch")


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("replace", ["p.data = clone", "model.bfloat16()", "model.double()"])
def test_storage_replaced_after_construction(device, backend, replace):
    """The step notices new storage and re-packs, state cast to the new dtype."""
    if replace == "model.double()" and backend != "torch":
        pytest.skip("float64 runs on the torch backend only: test_float64_params")
    if replace == "model.bfloat16()":
        skip_if_interpreted_bf16(device, backend, [torch.bfloat16])
    model, ref_model = _model(device), _model(device)
    opt = FusedAdamW(model.parameters(), lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    for m, o in ((model, opt), (ref_model, ref)):
        _train(m, o, 3, ZERO_GRADS["opt.zero_grad()"], device=device)
        with torch.no_grad():
            if replace == "p.data = clone":
                for p in m.parameters():
                    p.data = p.data.clone() * 0.5
            elif replace == "model.double()":
                m.double()
            else:
                m.bfloat16()
    if replace != "p.data = clone":  # torch.optim's states stay fp32: cast them like load_state_dict
        ref.load_state_dict(ref.state_dict())
    for m, o in ((model, opt), (ref_model, ref)):
        gen = torch.Generator().manual_seed(9)
        for _ in range(3):
            o.zero_grad()
            x = torch.randn(16, 7, generator=gen).to(device, next(m.parameters()).dtype)
            m(x).square().mean().backward()
            o.step()
    for (k, a), (_, b) in zip(model.state_dict().items(), ref_model.state_dict().items()):
        if replace == "model.bfloat16()":
            # bf16 states: fp32 math rounded once per tensor vs torch's rounding after every op
            torch.testing.assert_close(a, b, rtol=0, atol=2e-2, msg=lambda m: f"{k}: {m}")
        else:
            assert_close(a, b, backend, k, "training loop")
    for p in model.parameters():  # the step re-packed: params are views again, state follows
        assert opt.state[p]["exp_avg"].dtype == p.dtype


def test_float64_params():
    """The kernels compute in fp32: `auto` steps float64 on the torch backend, exactly as torch;
    naming a kernel backend for float64 raises with the reason."""
    params = make_params([(10,), (3, 4)], "cpu", dtype=torch.float64)
    ref_params = clone_params(params)
    opt, ref = FusedAdamW(params), torch.optim.AdamW(ref_params, foreach=False)
    for step in range(3):
        set_grads(params, ref_params, step)
        opt.step()
        ref.step()
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    if "cpu" in fused_adam.available_backends("cpu"):
        with pytest.raises(RuntimeError, match="'cpu' is unavailable for torch.float64 on cpu: "
                                               "the kernels compute in fp32"):
            FusedAdamW(clone_params(params), backend="cpu")


def test_sparse_grad_raises_and_changes_nothing():
    params = make_params([(5,), (4, 3)], "cpu")
    opt = FusedAdamW(params)
    set_grads(params, clone_params(params), 0)
    opt.step()
    before = [p.detach().clone() for p in params]
    state = {k: v.clone() for k, v in opt.state[params[0]].items()}
    set_grads(params, clone_params(params), 1)
    params[1].grad = params[1].grad.to_sparse()
    with pytest.raises(RuntimeError, match="Adam does not support sparse gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert all(torch.equal(opt.state[params[0]][k], v) for k, v in state.items())


@pytest.fixture(params=["own storage", "grads read in place"])
def large(request, monkeypatch):
    """Params of 32 elements and more stepped in their own storage (as 4M-element ones are), or
    packed with autograd's grads read where they are (as 64K-element ones are)."""
    name = "SOLO_NUMEL" if request.param == "own storage" else "GRAD_IN_PLACE_NUMEL"
    monkeypatch.setattr(fused_adam.flat, name, 32)
    return request.param


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("zero_grad", list(ZERO_GRADS))
@pytest.mark.parametrize("options", [{}, dict(amsgrad=True, max_grad_norm=0.1),
                                     dict(skip_nonfinite=True)])
def test_large_params_and_their_grads_are_read_where_they_are(device, backend, zero_grad, options,
                                                              large):
    model, ref_model = _model(device), _model(device)
    ptrs = [p.data_ptr() for p in model.parameters()]
    opt = FusedAdamW(model.parameters(), lr=1e-2, backend=backend, **options)
    solo = large == "own storage"
    assert sum(b.solo for b in opt._packing.buffers) == (3 if solo else 0)  # 231, 33, 99 elements
    if solo:
        assert [p.data_ptr() for p in model.parameters()][:3] == ptrs[:3]  # not copied
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False,
                            amsgrad=options.get("amsgrad", False))
    max_norm = options.get("max_grad_norm")

    def ref_zero_grad(m, o):
        ZERO_GRADS[zero_grad](m, o)

    _train(model, opt, 6, ZERO_GRADS[zero_grad], device=device)
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):  # _train, with torch's clipping where ours clips in the step
        x = torch.randn(16, 7, generator=gen).to(device)
        ref_zero_grad(ref_model, ref)
        ref_model(x).square().mean().backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(ref_model.parameters(), max_norm)
        ref.step()
    # The kernels' tolerance where the op order is not torch's: the clip coefficient sums in
    # another order than clip_grad_norm_, and a step counted on a GPU (skip_nonfinite) has its
    # scalars there, so the torch backend spells addcdiv_ out (1 ulp a step; seen on an H100).
    loose = max_norm or (device != "cpu" and options.get("skip_nonfinite"))
    assert_optimizers_match(opt, ref, "cpu" if loose else backend, "training loop")
    if solo:
        assert [p.data_ptr() for p in model.parameters()][:3] == ptrs[:3]
    if zero_grad == "opt.zero_grad()" and solo:  # autograd's grads read in place: no copy made
        assert all(b.grad is None for b in opt._packing.buffers if b.solo)
    elif zero_grad == "opt.zero_grad()":  # the 3 large ones' grads are autograd's, read in place
        (buf,) = [b for b in opt._packing.buffers if b.grad is None]  # no grad buffer
        assert buf.params == list(model.parameters())[:3] and "grad" not in buf.views
        assert all(p.grad.untyped_storage().nbytes() == p.grad.numel() * 4 for p in buf.params)


@pytest.mark.parametrize("device,backend", CASES)
def test_views_into_a_foreign_storage_are_stepped_where_they_are(device, backend):
    """Params viewing one larger storage not ours (ZeRO's bucket views, FSDP's flat param): one
    launch steps them in place, side by side, their grads read where they are: nothing copied in
    or out (28 B/param, not 52), and the storage they view holds the update."""
    bucket = torch.randn(100, generator=torch.Generator().manual_seed(0)).to(device)
    params = [torch.nn.Parameter(bucket[:30]), torch.nn.Parameter(bucket[30:].view(10, 7))]
    ref_params = clone_params(params)
    first = [p.detach().clone() for p in params]
    opt = FusedAdamW(params, lr=1e-2, backend=backend)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    (buf,) = opt._packing.buffers  # side by side: no memory overlaps, nothing ordered
    assert buf.in_place == {0, 1} and not buf.ordered and not buf.copied
    for step in range(3):
        set_grads(params, ref_params, step)
        opt.step()
        ref.step()
    assert_optimizers_match(opt, ref, backend)
    assert torch.equal(bucket[:30], params[0].detach()) and params[0].data_ptr() == bucket.data_ptr()
    for view, value in zip(buf.views["param"], first):  # our copy: never read, never written
        assert torch.equal(view.view(value.shape), value)
    for view, value in zip(buf.views["grad"], first):
        assert not view.any()  # the grads were read in place, not copied


def test_shards_with_device_step_counts_share_one_row(monkeypatch):
    """Params stepped in place with step counts on the device (skip_nonfinite, capturable, a
    GradScaler) and equal counts: one hyperparameter row computed on the device, not one per
    param (1000 FSDP2 shards cost ~10 small ops each a step)."""
    import fused_adam.functional as functional
    calls = []
    real = functional.device_row
    monkeypatch.setattr(functional, "device_row", lambda **kw: calls.append(1) or real(**kw))
    bucket = torch.randn(400)
    params = [torch.nn.Parameter(bucket[10 * k:10 * k + 10]) for k in range(40)]
    refs = clone_params(params)
    opt = FusedAdamW(params, lr=1e-2, skip_nonfinite=True)
    ref = torch.optim.AdamW(refs, lr=1e-2, foreach=False)
    for step in range(3):
        set_grads(params, refs, step, skip=(5,) if step == 1 else ())
        calls.clear()
        opt.step()
        ref.step()
        assert len(calls) == (2 if step == 2 else 1)  # param 5 counts one step less from then
    assert_optimizers_match(opt, ref, "cpu", "training loop")


@pytest.mark.parametrize("device,backend", CASES)
def test_packed_params_are_chunked_and_stepped_in_one_launch(device, backend, monkeypatch):
    """Buffers of at most CHUNK_NUMEL elements (construction copies one chunk at a time; a
    changed group re-packs only the chunks holding its params), all stepped by one launch."""
    from torch.profiler import profile
    monkeypatch.setattr(fused_adam.flat, "CHUNK_NUMEL", 64)
    params = make_params([(20,), (30,), (17,), (40,), (5, 5), (9,)], device)
    ref_params = clone_params(params)
    for p in (params[5], ref_params[5]):
        p.requires_grad_(False)

    def groups(ps):
        return [dict(params=ps[:4], lr=1e-2), dict(params=ps[4:], lr=3e-2, weight_decay=0.1)]
    opt = FusedAdamW(groups(params), backend=backend)
    ref = torch.optim.AdamW(groups(ref_params), foreach=False)
    buffers = list(opt._packing.buffers)
    # 32 + 32 | 32 + 48 > 64 | 48 | 32 (group 1's 5x5)
    assert [len(b.params) for b in buffers] == [2, 1, 1, 1]
    live = set(range(5))
    for step in range(4):
        if step == 2:  # unfrozen: group 1's chunk alone is rebuilt
            for p in (params[5], ref_params[5]):
                p.requires_grad_(True)
            live.add(5)
        set_grads(params, ref_params, step, skip=set(range(6)) - live)
        with profile() as prof:
            opt.step()
        ref.step()
        if backend == "cpu":
            calls = [e.count for e in prof.key_averages() if e.key == "fused_adam::adam_step_"]
            assert calls == [1], calls
    assert opt._packing.buffers[:3] == buffers[:3] and buffers[3] not in opt._packing.buffers
    assert_optimizers_match(opt, ref, backend)


@pytest.mark.parametrize("kind", ["grads read in place", "own storage", "small"])
def test_the_step_keeps_no_grad_alive_after_zero_grad(kind, monkeypatch):
    """After `zero_grad()` (set_to_none) nothing of ours holds the grads autograd made: a step
    holds as much memory as torch's (a grad kept to the next step cost one grad's worth)."""
    import gc
    import weakref
    if kind != "small":
        name = "SOLO_NUMEL" if kind == "own storage" else "GRAD_IN_PLACE_NUMEL"
        monkeypatch.setattr(fused_adam.flat, name, 32)
    model = _model("cpu")
    opt = FusedAdamW(model.parameters(), lr=1e-2, max_grad_norm=1.0)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(4, 7)).square().mean().backward()
        grads = [weakref.ref(p.grad) for p in model.parameters()]
        opt.step()
    opt.zero_grad()
    gc.collect()
    held = [ref() for ref in grads]
    assert all(g is None for g in held[:3]), [g is None for g in held]


def _uint64(*values):
    return array.array("Q", values).tobytes()


@pytest.mark.skipif(_ext.load() is not None, reason="the extension is not built")
def test_the_extensions_addresses_are_pythons():
    """csrc/census.cpp reads what Python reads: ids, data addresses (views at an offset
    included), grads' `_cdata` and data addresses; None where Python must read them itself."""
    base = torch.randn(10)
    p, q = torch.nn.Parameter(torch.randn(3)), base[2:5]
    p.grad = base[4:7]
    tensors = [p, q, base, p.grad]
    module = _ext.module()
    assert module.addresses(tensors, OBJECTS) == _uint64(*map(id, tensors))
    assert module.addresses(tensors, DATA) == _uint64(*(t.data_ptr() for t in tensors))
    assert module.addresses([p, q], GRADS) == _uint64(p.grad._cdata, p.grad.data_ptr(), 0, 0)
    # a grad a kernel reads as it is (1; 0: none), else None: Python looks at it
    assert module.addresses([p, q], GRADS_AS_THEY_ARE) == _uint64(1, 0)
    w = torch.nn.Parameter(torch.randn(3, 3))
    for grad in (torch.randn(3, 3).t(), torch.randn(3, 3, dtype=torch.float64), torch.randn(9)):
        w.grad = torch.zeros(3, 3)
        w.grad.data = grad  # (`p.grad = grad` refuses another shape or dtype)
        assert module.addresses([p, w], GRADS_AS_THEY_ARE) is None
    w.grad = torch.randn(3, 3).to_sparse()
    assert module.addresses([p, w], GRADS_AS_THEY_ARE) is None
    assert module.addresses((), DATA) == b""
    assert module.addresses([p, 1], DATA) is None  # not a tensor
    assert module.addresses([p, torch.randn(3).to_sparse()], DATA) is None  # no data address
    p.grad = torch.randn(3).to_sparse()
    assert module.addresses([p], GRADS) is None
    with pytest.raises(TypeError):
        module.addresses(5, DATA)
    # Whatever Python would run to read them is left to Python (it raised a C++ exception
    # through the C function: std::terminate), and an object claiming to be a tensor is not one.
    assert module.addresses([_Refusing(torch.randn(3))], DATA) is None
    assert module.addresses([_ClaimsToBeATensor()], DATA) is None


class _Refusing(torch.Tensor):
    """A wrapper subclass whose sizes go through a __torch_dispatch__ that refuses every op."""

    @staticmethod
    def __new__(cls, inner):
        return torch.Tensor._make_wrapper_subclass(cls, inner.shape, dtype=inner.dtype,
                                                   dispatch_sizes_strides_policy="sizes")

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        raise NotImplementedError(func)


class _ClaimsToBeATensor:
    __class__ = property(lambda self: torch.Tensor)


@pytest.mark.parametrize("census", ["extension", "python"])
def test_re_pointed_tensors_are_found_with_and_without_the_extension(census, monkeypatch):
    """Each step finds what user code re-pointed since the last one (a param's storage, our grad
    object's, a grad replaced, a state's storage) by comparing addresses, read by the
    extension or by Python (both: the extension loads at the first step)."""
    if census == "python":
        monkeypatch.setitem(_ext._state, "module", None)
    elif _ext.load() is not None:
        pytest.skip("the extension is not built")
    shapes = [(5,), (3, 4), (17,), (2,)]
    params = make_params(shapes, "cpu")
    ref_params = clone_params(params)
    opt = FusedAdamW(params, lr=1e-2)
    ref = torch.optim.AdamW(ref_params, lr=1e-2, foreach=False)
    assert (addresses(params, GRADS) is None) == (census == "python")
    edits = [
        lambda ps, o: None,
        lambda ps, o: setattr(ps[1], "data", ps[1].detach().clone() * 0.5),
        lambda ps, o: setattr(ps[0].grad, "data", ps[0].grad.clone() * 3),
        lambda ps, o: setattr(ps[2], "grad", ps[2].grad.clone() * -2),
        lambda ps, o: setattr(o.state[ps[3]]["exp_avg"], "data", o.state[ps[3]]["exp_avg"] + 1),
        lambda ps, o: o.state[ps[2]].__setitem__("exp_avg_sq", o.state[ps[2]]["exp_avg_sq"] * 4),
    ]
    set_grads(params, ref_params, 0)
    for edit in edits:
        for ps, o in ((params, opt), (ref_params, ref)):
            with torch.no_grad():
                edit(ps, o)
            o.step()
        assert_optimizers_match(opt, ref, "torch")
