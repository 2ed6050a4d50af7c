"""bf16/fp16 params, fp32 master weights, per-state dtypes: every backend against an fp64 run."""
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import CASES, make_params, set_grads, skip_if_interpreted_bf16
import fused_adam
from fused_adam import FusedAdamW

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
STEPS, LR = 20, 1e-2

# max |ours - fp64 reference| / max |reference| after STEPS steps, per tensor, by what is stored
# in low precision. Reasons: fp32 rounds each op (~1e-7 per step); a bf16 param keeps 8 bits, so
# every step rounds the update to 2**-8 of the param (20 steps: a few 1e-3); fp16 keeps 11
# bits; bf16 moments round m and v to 2**-8 relative each step, and the update m/sqrt(v) inherits
# ~1e-2 of that per step, on an update of LR.
TOLERANCE = {
    "fp32": 1e-5,
    "bf16 params": 3e-2,
    "fp16 params": 4e-3,
    "bf16 states": 5e-3,
}

CONFIGS = {  # name: (param dtype, optimizer options, tolerance of params, of the master copy)
    "fp32": (F32, {}, "fp32", None),
    "bf16": (BF16, {}, "bf16 params", None),
    "bf16+master": (BF16, dict(master_weights=True), "bf16 params", "fp32"),
    "fp16+master": (F16, dict(master_weights=True), "fp16 params", "fp32"),
    "fp32+bf16 states": (F32, dict(state_dtype=BF16), "bf16 states", None),
    "bf16+master+bf16 m": (BF16, dict(master_weights=True, state_dtype={"exp_avg": BF16}),
                           "bf16 params", "bf16 states"),
}
SHAPES = [(1025,), (7, 13), ()]


def _relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-12)).item()


def _run(params, opt, reference, ref_opt):
    for step in range(STEPS):
        set_grads(params, reference, step)  # the same (param-dtype) grads for both
        opt.step()
        ref_opt.step()


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_against_fp64(device, backend, config):
    dtype, options, tol_key, master_tol_key = CONFIGS[config]
    state_dtype = options.get("state_dtype")
    skip_if_interpreted_bf16(device, backend, [dtype, *(state_dtype.values() if isinstance(
        state_dtype, dict) else [state_dtype])])
    params = make_params(SHAPES, device, dtype=dtype)
    reference = [p.detach().double().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=LR, backend=backend, **options)
    ref_opt = torch.optim.AdamW(reference, lr=LR, foreach=False)
    _run(params, opt, reference, ref_opt)
    for p, r in zip(params, reference):
        assert p.dtype == dtype
        assert _relative(p, r) <= TOLERANCE[tol_key], (config, _relative(p, r))
        state = opt.state[p]
        assert ("master_param" in state) == (master_tol_key is not None)
        if master_tol_key:
            assert state["master_param"].dtype == F32
            assert torch.equal(state["master_param"].to(dtype), p.detach())
            assert _relative(state["master_param"], r) <= TOLERANCE[master_tol_key]
        expected_m = options.get("state_dtype", {}).get("exp_avg") if isinstance(
            options.get("state_dtype"), dict) else options.get("state_dtype")
        default = F32 if options.get("master_weights") else dtype
        assert state["exp_avg"].dtype == (expected_m or default)


@pytest.mark.parametrize("device,backend", CASES)
def test_master_weights_track_an_fp32_run(device, backend):
    """bf16 params with an fp32 master, fed bf16 grads, step the master exactly as an fp32 run on
    the same values steps its params: the same kernel on the same fp32 numbers."""
    skip_if_interpreted_bf16(device, backend, [BF16])
    params = make_params(SHAPES, device, dtype=BF16)
    fp32 = [p.detach().float().requires_grad_() for p in params]
    opt = FusedAdamW(params, lr=LR, master_weights=True, backend=backend)
    ref = FusedAdamW(fp32, lr=LR, backend=backend)
    for step in range(STEPS):
        set_grads(params, fp32, step)  # bf16 grads, and their exact fp32 values
        opt.step()
        ref.step()
    for p, q in zip(params, fp32):
        torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=1e-6, atol=1e-7)
        assert torch.equal(p.detach(), q.detach().to(BF16))


@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="torch without grad_dtype")
@pytest.mark.parametrize("device,backend", CASES)
def test_fp32_grads_of_bf16_params(device, backend):
    """A bf16 param with `grad_dtype = float32` gets fp32 grads from autograd; they accumulate
    straight into an fp32 grad buffer, and the master steps as an fp32 model would."""
    skip_if_interpreted_bf16(device, backend, [BF16])
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(device, BF16)
    ref = torch.nn.Linear(16, 8).to(device)
    with torch.no_grad():
        for p, q in zip(model.parameters(), ref.parameters()):
            q.copy_(p)
            p.grad_dtype = F32
    opt = FusedAdamW(model.parameters(), lr=LR, master_weights=True, backend=backend)
    ref_opt = FusedAdamW(ref.parameters(), lr=LR, backend=backend)
    x = torch.randn(32, 16, device=device)
    for _ in range(4):
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad(set_to_none=False)
            # both forwards see the weights rounded to bf16 (the bf16 model's own values), in
            # fp32 math, so both get the same fp32 grads
            w, b = (t.to(BF16).float() for t in m.parameters())
            torch.nn.functional.linear(x, w, b).square().mean().backward()
            o.step()
    weight, bias = model.parameters()
    assert bias.grad.data_ptr() - weight.grad.data_ptr() == 128 * 4  # one fp32 grad buffer
    for p, q in zip(model.parameters(), ref.parameters()):
        assert p.grad.dtype == F32
        torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
def test_master_and_fp32_states_survive_a_checkpoint(device, backend):
    skip_if_interpreted_bf16(device, backend, [BF16])
    params = make_params(SHAPES, device, dtype=BF16)
    opt = FusedAdamW(params, lr=LR, master_weights=True, backend=backend)
    for step in range(3):
        set_grads(params, [p.detach().clone() for p in params], step)
        opt.step()
    buf = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    resumed = [p.clone().requires_grad_() for p in ckpt["params"]]
    opt2 = FusedAdamW(resumed, lr=LR, backend=backend)  # options come from the checkpoint
    opt2.load_state_dict(ckpt["opt"])
    assert opt2.param_groups[0]["master_weights"]
    for p, q in zip(params, resumed):
        for key, value in opt.state[p].items():
            assert value.dtype == opt2.state[q][key].dtype and torch.equal(value, opt2.state[q][key]), key
    for step in range(3, 6):
        set_grads(params, resumed, step)
        opt.step()
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q) and torch.equal(opt.state[p]["master_param"], opt2.state[q]["master_param"])
    # and torch.optim.AdamW loads it (casting states to bf16 and keeping the extra key)
    torch.optim.AdamW([p.detach().clone().requires_grad_() for p in params]).load_state_dict(opt.state_dict())


def test_state_dtype_is_checked():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="state_dtype must be one of"):
        FusedAdamW(p, state_dtype=torch.int8)
    with pytest.raises(ValueError, match="state_dtype keys"):
        FusedAdamW(p, state_dtype={"momentum": torch.bfloat16})
    with pytest.raises(ValueError, match="complex params keep their states"):
        FusedAdamW([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))], state_dtype=BF16)


def test_grad_scaler_on_a_default_optimizer():
    """torch.amp.GradScaler with no option set: the optimizer does not advertise the in-kernel
    protocol (as torch's default AdamW), so the scaler unscales and skips on the host
    (test_skip_nonfinite.py has the in-kernel protocol with skip_nonfinite)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    ref_model = torch.nn.Linear(8, 4)
    ref_model.load_state_dict(model.state_dict())
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=1e-2, foreach=False)
    scalers = [torch.amp.GradScaler("cpu", init_scale=1024.0) for _ in range(2)]
    x = torch.randn(16, 8)
    for step in range(4):
        for m, o, s in ((model, opt, scalers[0]), (ref_model, ref, scalers[1])):
            o.zero_grad()
            s.scale(m(x).square().mean()).backward()
            if step == 2:  # an overflow: the step is skipped and the scale halves
                next(m.parameters()).grad[0, 0] = float("inf")
            s.step(o)
            s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() == 1024.0 * 2**-1
    assert float(opt.state[model.weight]["step"]) == 3.0 and float(opt.skipped_steps) == 0.0
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device,backend", CASES)
@pytest.mark.parametrize("write", ["copy_", "clamp_", "load_state_dict"])
def test_a_write_to_the_param_wins_over_the_master(device, backend, write):
    """model.load_state_dict, weight clipping, an EMA swap: the step continues from the written
    param (as torch.optim would), not from the stale master."""
    skip_if_interpreted_bf16(device, backend, [BF16])
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 8).to(device, BF16)
    ref = torch.nn.Linear(16, 8).to(device)
    ref.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    opt = FusedAdamW(model.parameters(), lr=LR, master_weights=True, backend=backend)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR, foreach=False)
    target = {k: torch.randn_like(v) for k, v in model.state_dict().items()}  # bf16 values
    for step in range(5):
        if step == 2:
            with torch.no_grad():
                for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                    if write == "copy_":
                        p.copy_(target[name])
                    elif write == "clamp_":  # bounds exact in bf16
                        p.clamp_(-2**-4, 2**-4)
                        q.clamp_(-2**-4, 2**-4)
                    if write == "copy_":
                        q.copy_(p.float())
            if write == "load_state_dict":
                model.load_state_dict(target)
                ref.load_state_dict({k: v.float() for k, v in target.items()})
        gen = torch.Generator().manual_seed(step)
        for p, q in zip(model.parameters(), ref.parameters()):
            g = torch.randn(p.shape, generator=gen).to(device)
            p.grad, q.grad = g.to(BF16), g.to(BF16).float()
        opt.step()
        ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(opt.state[p]["master_param"], q.detach(), rtol=1e-5, atol=1e-6)


def _edge_floats() -> torch.Tensor:
    """fp32 values at every exponent with the mantissa patterns fp16 rounding turns on: exact
    halves, ties (to even: both ways), just above and below ties, values that round to the next
    binade or overflow to inf, fp16 subnormals and zeros; both signs; inf and NaNs with payloads
    (quiet, signalling, negative). 7 more than a multiple of 16: the last go through the
    instructions' tail."""
    exponent = torch.arange(256, dtype=torch.int64) << 23  # (255: inf, and NaNs with payloads)
    low = torch.tensor([0, 1, 0x0FFF, 0x1000, 0x1001, 0x2000, 0x3000, 0x7FFFFF, 0x7FF000,
                        0x400000, 0x401000, 0x3FF000], dtype=torch.int64)
    bits = (exponent[:, None] | low[None, :]).flatten()
    tail = torch.tensor([0x7F800001, 0x7FC00000, 0x7FFFFFFF, 0x7FA00000, 0x7F802000, 0x3F801000,
                         0x33801000], dtype=torch.int64)  # (NaNs, a tie, a subnormal tie)
    bits = torch.cat([bits, bits | (1 << 31), tail])
    return bits.to(torch.int32).view(torch.float32)


def _half_bits(x: torch.Tensor) -> torch.Tensor:
    """x rounded to fp16 as vcvtps2ph rounds (torch's `.half()`, but a NaN keeps the top of its
    payload, quieted, whichever of its paths torch takes), as int16 bits."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = ((bits >> 16) & 0x8000) | 0x7E00 | ((bits >> 13) & 0x3FF)
    return torch.where(x.isnan(), nan, x.half().view(torch.int16).to(torch.int64) & 0xFFFF).to(
        torch.int32).to(torch.int16)


@pytest.mark.parametrize("device,backend", CASES)
def test_fp16_conversions_are_torchs_on_every_half_and_edge_floats(device, backend):
    """The CPU kernel converts fp16 with the hardware's instructions a block at a time and the
    rest with its own code (csrc/adam_cpu.cpp), the GPU kernels with theirs: bitwise as torch's
    `.half()` / `.float()`, and on the CPU NaN payloads as the instructions keep them (a NaN's
    bits may not depend on the path, the thread count or where a block ends; found by review).
    A step of lr 0 on zero grads changes no value: each of the 65536 fp16 params is widened and
    narrowed back as it was (a NaN quieted); an fp32 master set to edge floats, with its param
    their rounding, is kept (the kernel checks that the param is the master's rounding: one that
    differs counts as written by user code, and the master would then become the param)."""
    nans = torch.tensor([0x7E01, 0xFE01, 0x7C01, 0x7FFF, 0x7D55, 0xFC02, 0x7E80, 0x7F00, 0xFFFF,
                         0x7C20, 0x7E00, 0x7DFF, 0xFE3F])  # (13: the tail of the last block)
    every = torch.cat([torch.arange(65536), nans]).to(torch.int32).to(torch.int16).view(F16)
    masters = _edge_floats()
    halves = torch.nn.Parameter(every.clone().to(device))
    rounded = torch.nn.Parameter(_half_bits(masters).view(F16).to(device))
    plain = FusedAdamW([halves], lr=0.0, weight_decay=0.0, backend=backend)
    master = FusedAdamW([rounded], lr=0.0, weight_decay=0.0, master_weights=True, backend=backend)
    for p in (halves, rounded):
        p.grad = torch.zeros_like(p)
    plain.step()
    master.step()  # the master made from the param
    with torch.no_grad():
        master.state[rounded]["master_param"].copy_(masters)
    master.step()

    def compared(x):  # (torch's ops and a GPU's conversions make NaNs of their own: a NaN of
        # theirs only has to stay one)
        return torch.ones(x.shape, dtype=bool) if backend == "cpu" else x.isnan().logical_not()

    quieted = torch.where(every.isnan(), every.view(torch.int16) | 0x200, every.view(torch.int16))
    for got, want, same in ((halves, quieted, compared(every)),
                            (rounded, _half_bits(masters), compared(masters))):
        got = got.detach().cpu()
        assert torch.equal(got.view(torch.int16)[same], want[same]) and got[~same].isnan().all()
    kept = master.state[rounded]["master_param"].cpu()
    finite = ~masters.isnan()  # (a NaN master differs from its param's widening: "written")
    assert torch.equal(kept[finite].view(torch.int32), masters[finite].view(torch.int32))


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_fp16_conversions_on_cpus_without_avx512(capability):
    """The CPU kernel's fp16 blocks convert 16 at a time with AVX-512, 8 with F16C, or as
    c10::Half, by what torch's CPU capability allows (ATEN_CPU_CAPABILITY caps it): the two
    narrower paths, in a child process each, on the test above."""
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not built")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
           "test_fp16_conversions_are_torchs and cpu-cpu", __file__]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.returncode == 0 and "1 passed" in out.stdout, out.stdout[-3000:] + out.stderr[-2000:]
