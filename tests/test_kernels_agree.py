"""The kernels (Triton, the extension's CPU and CUDA kernels) implement one math contract with
the same roundings, so on the same inputs they must agree bit for bit, for every mode and dtype.
Pairs that cannot run here skip: the CPU pair runs in the TRITON_INTERPRET=1 child process."""
import itertools

import pytest
import torch

import fused_adam
from conftest import INTERPRET, INTERPRETER_TRUNCATES_BF16
from fused_adam.functional import adam_step_

KERNELS = [("triton", "cpu"), ("triton", "cuda"), ("cpu", "cuda")]
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [  # (param, grad, exp_avg, exp_avg_sq, master copy)
    (F32, F32, F32, F32, False),
    (BF16, BF16, BF16, BF16, False),
    (F16, F16, F16, F16, False),
    (BF16, BF16, F32, F32, True),   # bf16 params with fp32 master weights and states
    (F16, F32, F32, F32, True),     # fp16 params, fp32 grads
    (F32, F32, BF16, F32, False),   # bf16 first moment only
    (BF16, F32, BF16, BF16, True),  # fp32 master, bf16 states
]
MODES = list(itertools.product([False, True], [0.0, 0.1], [False, True], [False, True]))


NAMES = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
N = 4099  # not a multiple of any vector width or block


def _inputs(dtypes, gen):
    """param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq and an fp32 master copy of the param."""
    p_dtype, g_dtype, m_dtype, v_dtype, _ = dtypes
    master = torch.randn(N, generator=gen)
    return [master.to(p_dtype), torch.randn(N, generator=gen).to(g_dtype),
            (torch.randn(N, generator=gen) * 0.1).to(m_dtype),
            (torch.rand(N, generator=gen) * 0.01).to(v_dtype),
            (torch.rand(N, generator=gen) * 0.02).to(v_dtype), master]


def _device(backend):
    return "cuda" if backend in ("cuda", "triton") and torch.cuda.is_available() else "cpu"


@pytest.mark.cuda  # on a CPU-only machine only the interpreted child runs a pair
@pytest.mark.parametrize("pair", KERNELS, ids="-vs-".join)
@pytest.mark.parametrize("dtypes", DTYPES, ids=lambda d: "-".join(
    [str(t).split(".")[1] for t in d[:4]] + (["master"] if d[4] else [])))
def test_kernels_agree_bitwise(pair, dtypes, request):
    for backend in pair:
        if backend not in fused_adam.available_backends(_device(backend), dtypes[0]):
            pytest.skip(f"{backend} is not available here")
    if "triton" in pair and INTERPRET and INTERPRETER_TRUNCATES_BF16 and BF16 in dtypes:
        # triton's interpreter (3.6, 3.9) truncates fp32 -> bf16 (1 + 3*2**-8 gives 1.0078125, not
        # 1.015625), ignoring fp_downcast_rounding; compiled kernels round to nearest even.
        # The bf16 paths of the CPU kernel are checked against the reference below.
        request.applymarker(pytest.mark.xfail(strict=True, reason="interpreter truncates to bf16"))
    with_master = dtypes[4]
    gen = torch.Generator().manual_seed(0)
    for maximize, wd, decoupled, amsgrad in MODES:
        base = _inputs(dtypes, gen)
        results = []
        for backend in pair:
            ts = [t.to(_device(backend), copy=True) for t in base]
            for step in (1, 2, 7):
                adam_step_(*ts[:4], ts[4] if amsgrad else None, ts[5] if with_master else None,
                           step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                           decoupled_weight_decay=decoupled, maximize=maximize, backend=backend)
            results.append([t.cpu() for t in ts])
        for name, a, b in zip(NAMES, *results):
            assert torch.equal(a, b), (f"{pair} differ in {name} for maximize={maximize} wd={wd} "
                                       f"decoupled={decoupled} amsgrad={amsgrad}")


@pytest.mark.parametrize("dtypes", DTYPES[1:], ids=lambda d: "-".join(
    [str(t).split(".")[1] for t in d[:4]] + (["master"] if d[4] else [])))
def test_cpu_kernel_matches_reference_on_mixed_dtypes(dtypes):
    """The reference (torch ops on fp32 copies, rounded once) and the CPU kernel differ only by
    torch's CPU sqrt (1 ulp in ~17% of elements), so each stored tensor within one ulp of its
    dtype."""
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not available here")
    with_master = dtypes[4]
    base = _inputs(dtypes, torch.Generator().manual_seed(1))
    results = []
    for backend in ("torch", "cpu"):
        ts = [t.clone() for t in base]
        for step in (1, 2, 7):
            adam_step_(*ts[:5], ts[5] if with_master else None, step=step, lr=1e-2, beta1=0.9,
                       beta2=0.999, eps=1e-8, weight_decay=0.1, decoupled_weight_decay=True,
                       backend=backend)
        results.append(ts)
    for name, a, b in zip(NAMES, *results):
        eps = torch.finfo(a.dtype).eps
        torch.testing.assert_close(a, b, rtol=2 * eps, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _table_case(gen, dtypes):
    """Two buffers, 67 segments: odd starts (misaligned), odd lengths, an empty one, three rows
    (Adam with L2 and maximize; AdamW; no decay) at three step counts, one row used twice."""
    from fused_adam.functional import hyper_row
    buffers = [_inputs(dtypes, gen) for _ in range(2)]
    rows = [hyper_row(step=3, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
                      maximize=True),
            hyper_row(step=1, lr=3e-3, beta1=0.8, beta2=0.99, eps=1e-6, weight_decay=0.05,
                      decoupled_weight_decay=True),
            hyper_row(step=11, lr=2e-2, beta1=0.95, beta2=0.9, eps=1e-7, bias_correction=False)]
    segments = [(0, 0, 1024, 0, 0), (0, 1024, 1, 1, 1024), (0, 1025, 3, 2, 1025),
                (0, 1028, 0, 1, 1028), (0, 1031, N - 1031, 0, 1031), (1, 5, 2000, 2, 5),
                (1, 2005, 1, 1, 2005)]
    # and 60 more of 1-3 elements: past the 40 a CUDA launch takes, so the table spans launches
    segments += [(1, 2010 + 4 * k, 1 + k % 3, k % 3, 2010 + 4 * k) for k in range(60)]
    return buffers, torch.tensor(rows, dtype=torch.float64), segments


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["triton", "cpu", "cuda"])
@pytest.mark.parametrize("dtypes", [DTYPES[0], DTYPES[3]], ids=["float32", "bf16-master"])
def test_a_segment_table_steps_as_its_segments_one_by_one(backend, dtypes):
    """One launch over a table equals each segment stepped alone with its row (bit for bit), and
    the CPU kernel's bits (Triton under the interpreter too); elements outside every segment are
    untouched."""
    from fused_adam.functional import step_segments_
    device = _device(backend)
    if backend not in fused_adam.available_backends(device, dtypes[0]):
        pytest.skip(f"{backend} is not available here")
    buffers, hyper, segments = _table_case(torch.Generator().manual_seed(2), dtypes)
    with_master = dtypes[4]

    def lists(bufs):
        return ([b[0] for b in bufs], [b[1] for b in bufs], [b[2] for b in bufs],
                [b[3] for b in bufs], [b[4] for b in bufs], [b[5] for b in bufs] if with_master else [])

    together = [[t.to(device, copy=True) for t in b] for b in buffers]
    step_segments_(*lists(together), hyper, [x for s in segments for x in s], backend=backend)
    alone = [[t.to(device, copy=True) for t in b] for b in buffers]
    for s in segments:
        step_segments_(*lists(alone), hyper, list(s), backend=backend)
    covered = torch.zeros(2, N, dtype=torch.bool)
    for b, start, length, _, _ in segments:
        covered[b, start:start + length] = True
    for b in range(2):
        for name, a, c, before in zip(NAMES, together[b], alone[b], buffers[b]):
            if name == "master" and not with_master:
                continue
            assert torch.equal(a.cpu(), c.cpu()), f"buffer {b} {name}"
            if name != "grad":
                assert torch.equal(a.cpu()[~covered[b]], before[~covered[b]]), f"{name} outside"
                assert not torch.equal(a.cpu()[covered[b]], before[covered[b]]), f"{name} not stepped"
    truncates = INTERPRET and INTERPRETER_TRUNCATES_BF16 and BF16 in dtypes  # see above
    if backend != "cpu" and not truncates and "cpu" in fused_adam.available_backends("cpu"):
        on_cpu = [[t.clone() for t in b] for b in buffers]
        step_segments_(*lists(on_cpu), hyper, [x for s in segments for x in s], backend="cpu")
        for b in range(2):
            for name, a, c in zip(NAMES, together[b], on_cpu[b]):
                assert torch.equal(a.cpu(), c), f"buffer {b} {name}: {backend} vs cpu"


@pytest.mark.parametrize("param_dtype,state_dtype,kind", [
    (F32, F32, "plain"), (F32, BF16, "plain"), (F32, F16, "plain"), (BF16, BF16, "plain"),
    (F16, F16, "plain"), (BF16, F32, "master"), (F16, F32, "master"), (BF16, BF16, "master"),
    (BF16, F32, "stochastic"), (BF16, BF16, "stochastic")],
    ids=lambda x: x if isinstance(x, str) else str(x).split(".")[1])
def test_cpu_kernel_fused_loop_matches_its_staged_path(param_dtype, state_dtype, kind):
    """The CPU kernel runs a mix of operand dtypes it has a loop for in one fused pass and any
    other mix through fp32 blocks. Grads of another dtype holding the same values take the
    second path: every stored bit must be the same (every mode, 3 steps, a length that leaves a
    scalar tail)."""
    if "cpu" not in fused_adam.available_backends("cpu"):
        pytest.skip("the CPU extension is not available here")
    other = BF16 if param_dtype == F32 else F32  # a grad dtype with no fused loop for this param
    gen = torch.Generator().manual_seed(3)
    for maximize, wd, decoupled, amsgrad in MODES:
        master = torch.randn(N, generator=gen)
        grad = torch.randn(N, generator=gen).to(param_dtype).to(other).to(param_dtype)
        base = [master.to(param_dtype), grad, (torch.randn(N, generator=gen) * 0.1).to(state_dtype),
                (torch.rand(N, generator=gen) * 0.01).to(state_dtype),
                (torch.rand(N, generator=gen) * 0.02).to(state_dtype), master]
        results = []
        for grad_dtype in (param_dtype, other):
            ts = [t.clone() for t in base]
            ts[1] = ts[1].to(grad_dtype)
            for step in (1, 2, 7):
                adam_step_(*ts[:4], ts[4] if amsgrad else None, ts[5] if kind == "master" else None,
                           step=step, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                           decoupled_weight_decay=decoupled, maximize=maximize, backend="cpu",
                           stochastic_rounding_seed=7 if kind == "stochastic" else None)
            results.append(ts)
        for name, a, b in zip(NAMES, *results):
            if name != "grad":
                assert torch.equal(a, b), (f"{name} differs for maximize={maximize} wd={wd} "
                                           f"decoupled={decoupled} amsgrad={amsgrad}")
