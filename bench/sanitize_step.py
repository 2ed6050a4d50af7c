"""Step every kernel over odd sizes, misaligned views and every mode: what `make gpu-check` runs
under `compute-sanitizer --tool memcheck`, where an out-of-bounds or misaligned access is an
error even when the numbers come out right.

On CUDA the kernels are "triton" and "cuda" (the extension); without a GPU the script still runs
(the extension's "cpu" kernel) so that a rehearsal checks the script itself. Each result is
compared with the "torch" reference backend run on CPU copies of the same inputs (tolerance: a
few ulps of each stored dtype, the kernels' correctly rounded sqrt against torch's), and the
elements just outside each view (guards poisoned with NaN) must be untouched: memcheck sees reads
past a whole allocation (gpu-check turns torch's caching allocator off for this), the guards see
stray writes next to a view. Sizes and offsets are the outer loops, so a run cut short has covered
every dtype and mode at the smallest sizes; 8-bit states (codes guarded with 0xAB) each time
too. Last, one launch over a segment table of 67 segments per dtype (the CUDA kernel takes 40 a
launch).

    python bench/sanitize_step.py [--device cuda|cpu]
"""
from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_adam  # noqa: E402
from fused_adam.functional import adam_step_  # noqa: E402

# 1: no aligned body at all; 17: a body of 16 and a tail of 1; 4099: several programs and a tail
# (with 8-bit states: 17 blocks of scales, the last of 3 elements).
SIZES = (1, 17, 4099)
# Element offsets of each view into a larger buffer: 0 keeps 16-byte alignment, 3 breaks it.
OFFSETS = (0, 3)
GUARD = 8
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
# (param, grad, states, master copy, stochastic rounding)
DTYPES = [(F32, F32, F32, False, False), (BF16, BF16, BF16, False, False),
          (F16, F32, F32, True, False), (BF16, BF16, F32, False, True)]
# Every flag at least once, and together: (maximize, weight_decay, decoupled, amsgrad, clip,
# device step with found_inf, found_inf set: a skipped step must write nothing)
MODES = [(False, 0.0, False, False, False, False, False), (True, 0.1, False, True, False, False, False),
         (False, 0.1, True, True, True, False, False), (False, 0.1, True, False, True, True, False),
         (True, 0.0, True, True, False, True, False), (False, 0.1, True, True, True, True, True)]


def _views(n, offset, dtypes, device, gen):
    """param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master: views at `offset` into buffers
    with NaN guards on both sides."""
    p_dtype, g_dtype, s_dtype, _, _ = dtypes
    base = torch.randn(n, generator=gen)
    values = [base, torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.1,
              torch.rand(n, generator=gen) * 0.01, torch.rand(n, generator=gen) * 0.02, base]
    kinds = [p_dtype, g_dtype, s_dtype, s_dtype, s_dtype, F32]
    out = []
    for value, dtype in zip(values, kinds):
        buf = torch.full((offset + n + GUARD,), float("nan"), dtype=dtype, device=device)
        view = buf[offset:offset + n]
        view.copy_(value)
        out.append((buf, view))
    return out


def _run(backend, n, offset, dtypes, mode, device):
    maximize, wd, decoupled, amsgrad, clip, device_step, skip = mode
    views = _views(n, offset, dtypes, device, torch.Generator().manual_seed(n + offset))
    t = [v for _, v in views]
    found_inf = torch.full((), float(skip), device=device)
    for step in (1, 2, 3):
        adam_step_(*t[:4], t[4] if amsgrad else None, t[5] if dtypes[3] else None,
                   step=torch.tensor(float(step), device=device) if device_step else step,
                   lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                   decoupled_weight_decay=decoupled, maximize=maximize,
                   stochastic_rounding_seed=7 if dtypes[4] and not device_step else None,
                   clip_coef=torch.full((1,), 0.5, device=device) if clip else None,
                   found_inf=found_inf if device_step else None, backend=backend)
    return [(buf.cpu(), offset, n) for buf, _ in views]


# 8-bit states (uint8 codes + a scale per 256 elements): (param, master copy, stochastic), and
# (weight_decay, device step with found_inf, found_inf set)
Q8_DTYPES = [(F32, False, False), (BF16, True, False), (BF16, False, True)]
Q8_MODES = [(0.1, False, False), (0.0, True, False), (0.1, True, True)]
CODE_GUARD = 0xAB  # the codes' guards (no NaN in uint8)


def _run_q8(backend, n, offset, dtypes, mode, device):
    """param, grad, master, codes and scales of both moments (guarded views) after 3 steps."""
    from fused_adam import quantize
    p_dtype, master, stochastic = dtypes
    wd, device_step, skip = mode
    gen = torch.Generator().manual_seed(n + offset)
    base = torch.randn(n, generator=gen)
    m, m_absmax = quantize.quantize(torch.randn(n, generator=gen) * 0.1, "exp_avg")
    v, v_absmax = quantize.quantize(torch.rand(n, generator=gen) * 0.01, "exp_avg_sq")
    values = [base.to(p_dtype), torch.randn(n, generator=gen).to(p_dtype), base, m, v, m_absmax,
              v_absmax]
    views = []
    for value in values:
        fill = CODE_GUARD if value.dtype == torch.uint8 else float("nan")
        buf = torch.full((offset + value.numel() + GUARD,), fill, dtype=value.dtype, device=device)
        buf[offset:offset + value.numel()].copy_(value)
        views.append((buf, buf[offset:offset + value.numel()]))
    t = [v for _, v in views]
    found_inf = torch.full((), float(skip), device=device)
    for step in (1, 2, 3):
        adam_step_(t[0], t[1], t[3], t[4], None, t[2] if master else None, exp_avg_absmax=t[5],
                   exp_avg_sq_absmax=t[6],
                   step=torch.tensor(float(step), device=device) if device_step else step,
                   lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=wd,
                   decoupled_weight_decay=True,
                   stochastic_rounding_seed=7 if stochastic and not device_step else None,
                   found_inf=found_inf if device_step else None, backend=backend)
    return [(buf.cpu(), offset, view.numel()) for buf, view in views]


def _q8_mismatches(ours, ref, dtypes):
    """As _mismatches, for _run_q8's tensors: the codes may differ by a step where the
    reference's sqrt differs by an ulp (a few in a thousand), the rest within a few ulps."""
    names = ("param", "grad", "master", "exp_avg", "exp_avg_sq", "exp_avg_absmax",
             "exp_avg_sq_absmax")
    for name, (a, o, n), (b, _, _) in zip(names, ours, ref):
        inside = slice(o, o + n)
        guard = torch.cat([a[:o], a[o + n:]])
        intact = bool((guard == CODE_GUARD).all() if a.dtype == torch.uint8 else guard.isnan().all())
        if a.dtype == torch.uint8:
            close = (a[inside] != b[inside]).float().mean() <= 0.01
        else:
            rtol = 2**-7 if dtypes[2] and name == "param" else 4 * torch.finfo(a.dtype).eps
            close = torch.allclose(a[inside].float(), b[inside].float(), rtol=rtol, atol=1e-6,
                                   equal_nan=True)
        if not (intact and close):
            yield name


def _run_table(backend, dtypes, device):
    """One launch over 67 segments of two guarded buffers (odd starts and lengths, an empty
    segment, three rows; more segments than a CUDA launch takes): the table path's bounds."""
    from fused_adam.functional import hyper_row, step_segments_
    n, gen = 4099, torch.Generator().manual_seed(5)
    buffers = [_views(n, 3, dtypes, device, gen) for _ in range(2)]
    rows = torch.tensor([hyper_row(step=s, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=wd, decoupled_weight_decay=d,
                                   stochastic_rounding_seed=7 if dtypes[4] else None)
                         for s, wd, d in ((1, 0.0, False), (3, 0.1, True), (9, 0.1, False))],
                        dtype=torch.float64)
    segments = [(0, 0, 1024, 0, 0), (0, 1025, 3, 2, 1025), (0, 1028, 0, 1, 1028),
                (0, 1031, n - 1031, 1, 1031), (1, 5, 2000, 2, 5)]
    segments += [(1, 2010 + 4 * k, 1 + k % 3, k % 3, 2010 + 4 * k) for k in range(62)]
    lists = [[b[i][1] for b in buffers] for i in range(6)]
    step_segments_(*lists[:5], lists[5] if dtypes[3] else [], rows,
                   [x for s in segments for x in s], stochastic=dtypes[4], backend=backend)
    return [(buf.cpu(), 3, n) for b in buffers for buf, _ in b]


def _mismatches(ours, ref, dtypes):
    """Names of the tensors that differ from the reference or were written outside their view."""
    names = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master")
    for name, (a, o, n), (b, _, _) in zip(names, ours, ref):
        inside = slice(o, o + n)
        guards_intact = bool(torch.cat([a[:o], a[o + n:]]).isnan().all())
        tol = 4 * torch.finfo(a.dtype).eps
        if dtypes[4] and name == "param":  # stochastically rounded: up or down at random
            rtol, atol = 2**-7, 1e-3
        else:
            rtol, atol = tol, 1e-6
        if not (guards_intact and torch.allclose(a[inside].float(), b[inside].float(), rtol=rtol,
                                                 atol=atol, equal_nan=True)):
            yield name


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args(argv).device)
    kernels = [b for b in ("triton", "cuda", "cpu") if b in fused_adam.available_backends(device)]
    print(f"device {device}, kernels {kernels}", flush=True)
    failures, cases = [], 0
    for n, offset in itertools.product(SIZES, OFFSETS):
        for dtypes, mode in itertools.product(DTYPES, MODES):
            ref = _run("torch", n, offset, dtypes, mode, torch.device("cpu"))
            for backend in kernels:
                ours = _run(backend, n, offset, dtypes, mode, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # a kernel fault surfaces here, with its case
                cases += 1
                failures += [f"{backend} n={n} offset={offset} dtypes={dtypes} mode={mode}: {name}"
                             for name in _mismatches(ours, ref, dtypes)]
        for dtypes, mode in itertools.product(Q8_DTYPES, Q8_MODES):  # 8-bit states
            ref = _run_q8("torch", n, offset, dtypes, mode, torch.device("cpu"))
            for backend in kernels:
                ours = _run_q8(backend, n, offset, dtypes, mode, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                cases += 1
                failures += [f"{backend} 8-bit n={n} offset={offset} dtypes={dtypes} mode={mode}: "
                             f"{name}" for name in _q8_mismatches(ours, ref, dtypes)]
        print(f"n={n} offset={offset}: {cases} cases so far, {len(failures)} failures", flush=True)
    for dtypes in DTYPES:  # a segment table, against the reference's
        ref = _run_table("torch", dtypes, torch.device("cpu"))
        for backend in kernels:
            ours = _run_table(backend, dtypes, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            cases += 1
            failures += [f"{backend} segment table dtypes={dtypes}: {name}"
                         for name in _mismatches(ours[:6], ref[:6], dtypes)]
            failures += [f"{backend} segment table dtypes={dtypes}: {name} (buffer 1)"
                         for name in _mismatches(ours[6:], ref[6:], dtypes)]
    print(f"{cases} cases, {len(failures)} failures", flush=True)
    for line in failures[:20]:
        print("FAILED", line)
    return 1 if failures or not kernels else 0


if __name__ == "__main__":
    sys.exit(main())
