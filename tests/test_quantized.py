"""8-bit optimizer states (`state_dtype="int8"`, fused_adam/quantize.py): the format, the same
bits on every kernel, the error against an fp64 run, and checkpoints both ways with torch."""
import copy
import re
from pathlib import Path

import pytest
import torch

import fused_adam
from conftest import INTERPRET
from fused_adam import FusedAdam, FusedAdamW, quantize
from fused_adam.functional import adam_step_

KEYS = quantize.KEYS
N = 3 * quantize.QBLOCK + 77  # a partial last block


def test_format_constants_match_the_kernels_header():
    header = (Path(__file__).parent.parent / "csrc" / "adam_math.h").read_text()
    assert int(re.search(r"constexpr int kQBlock = (\d+);", header)[1]) == quantize.QBLOCK
    assert int(re.search(r"constexpr int32_t kQMantissa = (\d+);", header)[1]) == quantize.MANTISSA
    for name, table in (("kQBias", quantize.BIAS), ("kQTop", quantize.TOP)):
        found = re.search(name + r" = q == QState::kExpAvg \? (\d+) : (\d+);", header)
        assert (int(found[1]), int(found[2])) == (table["exp_avg"], table["exp_avg_sq"]), name


@pytest.mark.parametrize("key", KEYS)
def test_codes_keep_their_relative_error_over_16_binades(key):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=gen) * torch.logspace(-5, 0, 4096)  # 5 decades per block
    if key == "exp_avg_sq":
        x = x * x
    codes, absmax = quantize.quantize(x, key)
    back = quantize.decode(codes, absmax, key)
    scale = absmax.repeat_interleave(quantize.QBLOCK)
    lowest = 1.25 * 2.0 ** (-16 if key == "exp_avg" else -32)
    in_range = x.abs() >= lowest * scale
    assert in_range.float().mean() > 0.99
    bound = 2.0 ** -(quantize.MANTISSA + 1)  # half a step of the kept mantissa bits
    assert ((back - x).abs() <= x.abs() * bound)[in_range].all()
    assert ((back - x).abs() > x.abs() * bound / 2)[in_range].any()  # (the bound is tight)
    assert torch.equal(back.abs().view(-1, quantize.QBLOCK).amax(1), absmax)  # the max is exact
    if key == "exp_avg_sq":  # a positive second moment never decodes as 0 (lr/eps steps)
        assert (back[x > 0] > 0).all()
    zeros = torch.zeros(300)
    codes, absmax = quantize.quantize(zeros, key)
    assert not codes.any() and not absmax.any() and not quantize.decode(codes, absmax, key).any()


def _inputs(dtype, gen, master=False):
    """param, grad, exp_avg codes, exp_avg_sq codes, master, exp_avg absmax, exp_avg_sq absmax."""
    p = torch.randn(N, generator=gen)
    m, ma = quantize.quantize(torch.randn(N, generator=gen) * 1e-2, "exp_avg")
    v, va = quantize.quantize(torch.rand(N, generator=gen) * 1e-4, "exp_avg_sq")
    return [p.to(dtype), torch.randn(N, generator=gen).to(dtype), m, v,
            p.clone() if master else None, ma, va]


def _run(backend, base, steps=(1, 2, 7), **kw):
    device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
    ts = [None if t is None else t.to(device, copy=True) for t in base]
    for step in steps:
        adam_step_(*ts[:4], None, ts[4], exp_avg_absmax=ts[5], exp_avg_sq_absmax=ts[6], step=step,
                   lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                   decoupled_weight_decay=True, backend=backend, **kw)
    return [None if t is None else t.cpu() for t in ts]


MODES = {"fp32": (torch.float32, {}), "bf16+master": (torch.bfloat16, dict(master=True)),
         "bf16 stochastic": (torch.bfloat16, dict(stochastic_rounding_seed=5))}


@pytest.mark.cuda
@pytest.mark.parametrize("pair", [("cpu", "triton"), ("cpu", "cuda"), ("triton", "cuda")],
                         ids="-vs-".join)
@pytest.mark.parametrize("mode", MODES)
def test_kernels_agree_bitwise_on_8bit_states(pair, mode):
    dtype, kw = MODES[mode]
    for backend in pair:
        device = "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"
        if backend not in fused_adam.available_backends(device, dtype):
            pytest.skip(f"{backend} is not available here")
    # (the interpreter truncates fp32 -> bf16, test_kernels_agree.py: a master's bf16 image then
    # differs, and so the check whether user code wrote the param; stochastic rounding writes
    # bits, and the moments here do not depend on the param)
    truncated = INTERPRET and "triton" in pair and mode == "bf16+master"
    base = _inputs(dtype, torch.Generator().manual_seed(1), master=bool(kw.get("master")))
    kw = {k: v for k, v in kw.items() if k != "master"}
    a, b = (_run(backend, base, **kw) for backend in pair)
    for name, x, y in zip(("param", "grad", "exp_avg", "exp_avg_sq", "master", "exp_avg_absmax",
                           "exp_avg_sq_absmax"), a, b):
        assert x is None or (truncated and name in ("param", "master")) or torch.equal(x, y), name


@pytest.mark.parametrize("mode", MODES)
def test_cpu_kernel_matches_the_reference_on_8bit_states(mode):
    """The reference (decode, torch.optim's ops, encode) and the CPU kernel differ only by
    torch's CPU sqrt (1 ulp): a code now and then, a param within an ulp or two of its dtype."""
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not available here")
    dtype, kw = MODES[mode]
    base = _inputs(dtype, torch.Generator().manual_seed(2), master=bool(kw.get("master")))
    kw = {k: v for k, v in kw.items() if k != "master"}
    ref, cpu = _run("torch", base, **kw), _run("cpu", base, **kw)
    for codes in (2, 3):
        assert (ref[codes] != cpu[codes]).float().mean() < 0.01
    torch.testing.assert_close(ref[5], cpu[5], rtol=1e-5, atol=0)
    torch.testing.assert_close(ref[0].float(), cpu[0].float(), rtol=4 * torch.finfo(dtype).eps,
                               atol=1e-6)
    assert not torch.equal(cpu[2], base[2]) and not torch.equal(cpu[0], base[0])


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # per-element scales over 4 decades, as real grads have within a block
    sizes = [torch.Size(s).numel() for s in shapes]
    scales = [torch.logspace(-4, 0, n)[torch.randperm(n, generator=gen)].view(s)
              for s, n in zip(shapes, sizes)]
    return [[torch.randn(s, generator=gen) * c for s, c in zip(shapes, scales)]
            for _ in range(steps)]


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_8bit_states_track_an_fp64_run_block_by_block(backend):
    """Same grads into FusedAdamW(state_dtype="int8") and an fp64 torch AdamW: after 30 steps
    each block of the dequantized moments is within a few quantization steps of fp64's,
    relative to the block's absmax (each step re-encodes, so errors carry over, decaying by
    beta; measured max 0.096 for exp_avg and 0.149 for exp_avg_sq: an increment of exp_avg_sq
    under half a code's step is rounded away, beta2 = 0.999 adds 1/t of it a step)."""
    if backend not in fused_adam.available_backends("cpu"):
        pytest.skip(f"{backend} is not available here")
    shapes = [(64, 96), (5000,)]
    params = [torch.randn(s, generator=torch.Generator().manual_seed(3)) for s in shapes]
    ours = [p.clone().requires_grad_() for p in params]
    ref = [p.double().requires_grad_() for p in params]
    opt = FusedAdamW(ours, lr=1e-3, state_dtype="int8", backend=backend)
    ropt = torch.optim.AdamW(ref, lr=1e-3)
    for grads in _grads(shapes, 30):
        for ps, o in ((ours, opt), (ref, ropt)):
            for p, g in zip(ps, grads):
                p.grad = g.to(p.dtype)
            o.step()
    bounds = {"exp_avg": 0.15, "exp_avg_sq": 0.2}
    for p, r in zip(ours, ref):
        state = opt.state[p]
        assert state["exp_avg"].dtype == torch.uint8 and state["exp_avg"].shape == p.shape
        for key in KEYS:
            exact = ropt.state[r][key].reshape(-1)
            got = quantize.decode(state[key], state[quantize.absmax_key(key)], key).double()
            scale = quantize.block_absmax(exact.float()).double().repeat_interleave(
                quantize.QBLOCK)[:exact.numel()]
            worst = ((got - exact).abs() / scale).max().item()
            assert worst < bounds[key], (key, worst)
        torch.testing.assert_close(p.double(), r.detach(), rtol=0, atol=3e-3)


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 8))
    return model, _grads([p.shape for p in model.parameters()], 6, seed)


def _train(opt, params, grads):
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()


def _trained(seed, steps, **options):
    """(params, grads, an 8-bit optimizer after `steps` of the grads)."""
    model, grads = _model_and_grads(seed)
    params = list(model.parameters())
    opt = FusedAdamW(params, state_dtype="int8", **options)
    _train(opt, params, grads[:steps])
    return params, grads, opt


def test_small_params_keep_fp32_states_and_the_state_dict_is_compact():
    model, grads = _model_and_grads()
    params = list(model.parameters())
    opt = FusedAdamW(params, state_dtype="int8")
    _train(opt, params, grads[:2])
    sd = opt.state_dict()
    big, bias = sd["state"][0], sd["state"][1]  # 128x64 weight, 128 bias
    assert {k: v.dtype for k, v in big.items() if k != "step"} == {
        "exp_avg": torch.uint8, "exp_avg_sq": torch.uint8, "exp_avg_absmax": torch.float32,
        "exp_avg_sq_absmax": torch.float32}
    assert big["exp_avg_absmax"].shape == (64 * 128 // quantize.QBLOCK,)
    assert bias["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in bias
    state_bytes = sum(t.numel() * t.element_size() for k, t in big.items() if k != "step")
    assert state_bytes == (2 + 8 / quantize.QBLOCK) * params[0].numel()  # not 8 B/param


def test_checkpoints_move_both_ways_between_8bit_and_torch():
    model, grads = _model_and_grads(1)
    params = list(model.parameters())
    # an 8-bit state_dict resumes an 8-bit optimizer exactly
    opt = FusedAdamW(params, lr=1e-2, state_dtype="int8")
    _train(opt, params, grads[:3])
    saved, at = copy.deepcopy(opt.state_dict()), [p.detach().clone() for p in params]
    _train(opt, params, grads[3:])
    after = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, a in zip(params, at):
            p.copy_(a)
    again = FusedAdamW(params, lr=1e-2, state_dtype="int8")
    again.load_state_dict(saved)
    _train(again, params, grads[3:])
    assert all(torch.equal(p, a) for p, a in zip(params, after))
    # into torch: dequantize_state_dict gives fp32 moments in the params' shapes
    plain = quantize.dequantize_state_dict(again.state_dict())
    for s in plain["state"].values():
        assert set(s) == {"step", "exp_avg", "exp_avg_sq"} and s["exp_avg"].dtype == torch.float32
    torch_opt = torch.optim.AdamW(params, lr=1e-2)
    torch_opt.load_state_dict(plain)
    weight = params[0]
    expected = quantize.decode(again.state[weight]["exp_avg"],
                               again.state[weight]["exp_avg_absmax"], "exp_avg").view(weight.shape)
    assert torch.equal(torch_opt.state[weight]["exp_avg"], expected)
    # a torch checkpoint loads into an 8-bit optimizer: its moments quantized
    q8 = FusedAdamW(params, lr=1e-2, state_dtype="int8")
    q8.load_state_dict(torch_opt.state_dict())
    codes, absmax = quantize.quantize(torch_opt.state[weight]["exp_avg_sq"], "exp_avg_sq")
    assert torch.equal(q8.state[weight]["exp_avg_sq"], codes)
    assert torch.equal(q8.state[weight]["exp_avg_sq_absmax"], absmax)
    _train(q8, params, grads[:1])  # and steps


def test_switching_state_dtype_converts_the_states():
    params, grads, opt = _trained(2, 2)
    weight = params[0]
    values = quantize.decode(opt.state[weight]["exp_avg"], opt.state[weight]["exp_avg_absmax"],
                             "exp_avg").view(weight.shape)
    opt.param_groups[0]["state_dtype"] = None
    _train(opt, params, grads[2:3])
    assert opt.state[weight]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in opt.state[weight]
    expected = values.lerp(grads[2][0], 0.1)
    torch.testing.assert_close(opt.state[weight]["exp_avg"], expected)


@pytest.mark.parametrize("bad,error", [
    (dict(state_dtype="int8", amsgrad=True), "amsgrad"),
    (dict(state_dtype={"exp_avg": "int8"}), "together"),
    (dict(state_dtype="int4"), "state_dtype must be")])
def test_bad_8bit_options_raise(bad, error):
    with pytest.raises(ValueError, match=error):
        FusedAdam([torch.nn.Parameter(torch.randn(5000))], **bad)


def test_a_skipped_step_leaves_8bit_states_as_they_were():
    p = torch.nn.Parameter(torch.randn(5000))
    opt = FusedAdamW([p], state_dtype="int8", skip_nonfinite=True)
    p.grad = torch.randn(5000)
    opt.step()
    before = {k: v.clone() for k, v in opt.state[p].items()}
    value = p.detach().clone()
    p.grad = torch.full((5000,), float("nan"))
    opt.step()
    assert torch.equal(p, value)
    assert all(torch.equal(before[k], v) for k, v in opt.state[p].items())


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex64, torch.complex128])
def test_float64_and_complex_params_in_an_8bit_group_step_as_torch(dtype):
    """float64 and complex params in an 8-bit group keep states of their own precision and
    step as torch.optim.AdamW does."""
    gen = torch.Generator().manual_seed(4)
    start = torch.randn(5000, generator=gen, dtype=dtype)
    ours, ref = start.clone().requires_grad_(), start.clone().requires_grad_()
    opt = FusedAdamW([ours], lr=1e-2, state_dtype="int8")
    torch_opt = torch.optim.AdamW([ref], lr=1e-2, foreach=False)
    for _ in range(3):
        grad = torch.randn(5000, generator=gen, dtype=dtype)
        ours.grad, ref.grad = grad.clone(), grad.clone()
        opt.step()
        torch_opt.step()
    assert opt.state[ours]["exp_avg"].dtype == dtype and "exp_avg_absmax" not in opt.state[ours]
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_strided_params_codes_follow_their_memory_order_everywhere(layout):
    """A channels_last or transposed param's codes take its strides and the kernels block them
    in memory order: decoding (dequantize_state_dict), quantizing a torch checkpoint on load and
    switching state_dtype must use that order too."""
    gen = torch.Generator().manual_seed(5)
    if layout == "channels_last":
        weight = torch.randn(8, 32, 4, 4, generator=gen).to(memory_format=torch.channels_last)
    else:
        weight = torch.randn(64, 128, generator=gen).t()
    # grads whose scale differs per row: blocks in the wrong order mix scales
    rows = torch.logspace(-3, 0, weight.shape[0])[:, None]
    grads = [torch.randn(weight.shape, generator=gen) * rows.view(-1, *[1] * (weight.dim() - 1))
             for _ in range(3)]
    ours, ref = torch.nn.Parameter(weight.clone()), torch.nn.Parameter(weight.clone())
    opt = FusedAdamW([ours], lr=1e-2, state_dtype="int8")
    torch_opt = torch.optim.AdamW([ref], lr=1e-2)
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    exact = torch_opt.state[ref]["exp_avg"]
    scale = exact.abs().amax(dim=tuple(range(1, exact.dim())), keepdim=True)
    plain = quantize.dequantize_state_dict(opt.state_dict())["state"][0]["exp_avg"]
    assert ((plain - exact).abs() / scale).max() < 0.15
    q8 = FusedAdamW([ref], lr=1e-2, state_dtype="int8")  # a torch checkpoint, quantized on load
    q8.load_state_dict(torch_opt.state_dict())
    back = quantize.dequantize(q8.state[ref]["exp_avg"], q8.state[ref]["exp_avg_absmax"], "exp_avg")
    assert ((back - exact).abs() / scale).max() < 0.1
    q8.param_groups[0]["state_dtype"] = None  # and back to float states
    ref.grad = torch.zeros_like(ref)
    q8.step()
    assert ((q8.state[ref]["exp_avg"] / 0.9 - exact).abs() / scale).max() < 0.1


def test_a_bad_8bit_load_raises_with_nothing_changed():
    params, grads, opt = _trained(3, 2)
    before = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(before)
    bad["state"][0]["exp_avg_absmax"] = bad["state"][0]["exp_avg_absmax"][:3]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(bad)
    del bad["state"][0]["exp_avg_absmax"]
    with pytest.raises(ValueError, match="exp_avg_absmax"):
        opt.load_state_dict(bad)
    amsgrad = torch.optim.AdamW(params, amsgrad=True)
    with pytest.raises(ValueError, match="amsgrad"):
        opt.load_state_dict(amsgrad.state_dict())
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"]
    for pid, s in before["state"].items():
        assert all(torch.equal(v, after["state"][pid][k]) for k, v in s.items())
    _train(opt, params, grads[2:3])


@pytest.mark.parametrize("bad", [torch.int8, "int4", {"exp_avg": "int8"}])
def test_state_dtype_set_on_a_group_is_checked_before_the_step_changes_anything(bad):
    params, grads, opt = _trained(4, 1)
    values = [p.detach().clone() for p in params]
    opt.param_groups[0]["state_dtype"] = bad
    with pytest.raises(ValueError, match="state_dtype"):
        _train(opt, params, grads[1:2])
    assert all(torch.equal(p, v) for p, v in zip(params, values))
    opt.param_groups[0]["state_dtype"] = "int8"
    _train(opt, params, grads[1:2])
    assert opt.state[params[0]]["step"] == 2


def test_dequantized_checkpoint_keeps_the_loading_optimizers_state_dtype():
    params, grads, opt = _trained(5, 1)
    plain = quantize.dequantize_state_dict(opt.state_dict())
    assert all("state_dtype" not in g for g in plain["param_groups"])
    fp32 = FusedAdamW(params)
    fp32.load_state_dict(plain)
    _train(fp32, params, grads[1:2])
    assert fp32.param_groups[0]["state_dtype"] is None
    assert fp32.state[params[0]]["exp_avg"].dtype == torch.float32
