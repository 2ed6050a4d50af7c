"""One optimizer step of fused_adam against torch.optim.AdamW (for-loop, foreach, fused).

All providers run in one process on copies of the same params and grads, interleaved round by
round, so machine noise hits them alike; the table gives medians and the ratio to torch fused.
Bytes model (fp32, no amsgrad): read p, g, m, v + write p, m, v = 28 B/param; GB/s is that over
the median time, and "% copy" compares it with a plain device copy (read + write) timed here too.
The one-tensor shape also runs the mixed-precision options, each with its own bytes/param.

    python bench/bench.py [--device cpu|cuda] [--shapes one_16m many_16k gpt2_124m] [--reps N]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_adam  # noqa: E402

BYTES_PER_PARAM = 28  # fp32 p, g, m, v read; p, m, v written


def gpt2_124m_shapes():
    """GPT-2 small (124M params, lm_head tied to wte): 148 tensors."""
    d, layers = 768, 12
    shapes = [(50257, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


SHAPES = {
    "one_16m": [(1 << 24,)],
    "many_16k": [(1 << 14,)] * 1024,
    "gpt2_124m": gpt2_124m_shapes(),
}


def providers(device):
    """name -> (constructor(params), param dtype, bytes/param); ours once per backend here."""
    fp32 = torch.float32
    out = {f"fused_adam[{b}]": (lambda ps, b=b: fused_adam.FusedAdamW(ps, lr=1e-3, backend=b),
                                fp32, BYTES_PER_PARAM)
           for b in fused_adam.available_backends(device)}
    out["torch for-loop"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=False), fp32, 28)
    out["torch foreach"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), fp32, 28)
    out["torch fused"] = (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), fp32, 28)
    return out


def precision_providers(device):
    """The mixed-precision options (`auto` backend) and torch fused on bf16 params."""
    bf16, fp32 = torch.bfloat16, torch.float32
    ours = lambda **kw: lambda ps: fused_adam.FusedAdamW(ps, lr=1e-3, **kw)  # noqa: E731
    return {
        # bf16 p r/w 4, bf16 g 2, fp32 master r/w 8, fp32 m, v r/w 16
        "fused_adam bf16 + fp32 master": (ours(master_weights=True), bf16, 30),
        # fp32 p r/w 8, g 4, bf16 m, v r/w 8
        "fused_adam fp32, bf16 states": (ours(state_dtype=bf16), fp32, 20),
        # bf16 p r/w 4, g 2, fp32 m, v r/w 16
        "fused_adam bf16, stochastic rounding": (
            ours(stochastic_rounding=True, state_dtype=fp32), bf16, 22),
        # bf16 p r/w 4, g 2, bf16 m, v r/w 8
        "torch fused, bf16": (lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), bf16, 14),
    }


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn) -> float:
        """Seconds for one call of fn."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


def bench_shapes(name, shapes, device, reps, warmup, provider_table):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-2 for s in shapes]
    timer = Timer(device)
    runs = {}
    for pname, (make, dtype, nbytes) in provider_table.items():
        params = [t.to(device, dtype, copy=True).requires_grad_() for t in init]
        for p, g in zip(params, grads):
            p.grad = g.to(device, dtype)
        opt = make(params)
        for _ in range(warmup):  # state allocation, kernel compilation, first grad copy-in
            opt.step()
        runs[pname] = (opt, nbytes, [])
    for _ in range(reps):
        for opt, _, times in runs.values():
            times.append(timer(opt.step))
    n = sum(t.numel() for t in init)
    return [dict(shape=name, provider=p, tensors=len(shapes), params=n, bytes_per_param=nbytes,
                 median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3, reps=len(t))
            for p, (_, nbytes, t) in runs.items()]


def copy_gbps(device, reps):
    src = torch.randn(1 << 24, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(3):
        dst.copy_(src)
    t = statistics.median(timer(lambda: dst.copy_(src)) for _ in range(reps))
    return 8 * src.numel() / t / 1e9


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{_cpu_model()}, {torch.get_num_threads()} threads")
    return dict(device=name, device_type=device.type, torch=torch.__version__,
                triton=triton_version, python=platform.python_version(), commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def table(rows, copy):
    fused = {r["shape"]: r["median_ms"] for r in rows if r["provider"] == "torch fused"}
    foreach = {r["shape"]: r["median_ms"] for r in rows if r["provider"] == "torch foreach"}
    lines = ["| shape | provider | B/param | median ms | GB/s | % copy | vs fused | vs foreach |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbps = r["bytes_per_param"] * r["params"] / (r["median_ms"] / 1e3) / 1e9
        r["gbps"], r["pct_copy"] = gbps, 100 * gbps / copy
        r["speedup_vs_fused"] = fused[r["shape"]] / r["median_ms"]
        r["speedup_vs_foreach"] = foreach[r["shape"]] / r["median_ms"]
        lines.append(f"| {r['shape']} ({r['tensors']} tensors, {r['params'] / 1e6:.1f}M) | "
                     f"{r['provider']} | {r['bytes_per_param']} | {r['median_ms']:.2f} | {gbps:.1f} | "
                     f"{r['pct_copy']:.0f}% | "
                     f"{r['speedup_vs_fused']:.2f}x | {r['speedup_vs_foreach']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--reps", type=int, default=None, help="timed steps per provider")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(Path(__file__).parent / "results"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    reps = args.reps or (100 if device.type == "cuda" else 11)
    env = environment(device)
    copy = copy_gbps(device, reps)
    rows = []
    for name in args.shapes:
        table_ = providers(device)
        if name == "one_16m":
            table_ |= precision_providers(device)
        rows += bench_shapes(name, SHAPES[name], device, reps, warmup=3, provider_table=table_)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    md = table(rows, copy)
    header = (f"{env['device']}, torch {env['torch']}, triton {env['triton']}, {env['date']}, "
              f"commit {env['commit']}; device copy {copy:.1f} GB/s; median of {reps} steps")
    print(header)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{device.type}.json").write_text(
        json.dumps(dict(env, copy_gbps=copy, rows=rows), indent=1))
    (out / f"bench-{device.type}.md").write_text(header + "\n\n" + md + "\n")
    return rows


if __name__ == "__main__":
    main()
