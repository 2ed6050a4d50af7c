"""`make bench`: one optimizer step of fused_adam against torch.optim.AdamW (for-loop, foreach, fused).

Sections (all by default):
  sweep      one tensor of 2**k elements (CPU k = 12..26, GPU 12..28): GB/s from the bytes model
             and as % of a device copy of the same size timed in the same rounds
  models     GPT-2 124M, a Llama-style 1B (CPU: widths / 4, the same 146 tensors), ViT-B/16 and
             1024 x 16K: ms/step and the ratio to torch fused; GPT-2 once more in torch's default
             loop (`zero_grad()` sets grads to None, each step gets grads made anew)
  small      1000 tensors of 1 to 4K elements, where launches and Python dominate: host time of
             one step() call (on CPU the whole step); once in one group, once in 24 groups of
             layer-wise lr decay and per-group weight decay (one launch for all of them)
  precision  one 16M tensor: the mixed-precision options, each with its own bytes/param, and
             each row's stream limit: its bytes at the rate of an in-place pass over fp32
             (`add_`, read and write the same memory as a step does) timed in the same rounds;
             on CPU also each row's compute ceiling: its time per element in cache (2^13 and
             2^16 elements, one thread, the difference), times 16M over the threads

Every provider steps its own copy of identical params and grads; all run in one process,
interleaved round by round, so machine noise hits them alike. CPU: perf_counter per step, median of
at least 11 after 3 warm-up steps. GPU: CUDA events around each step after an L2 flush (as
triton.testing.do_bench), median of at least 25. Below 4x the last-level cache several copies of
each optimizer rotate, so that a step does not find its data in cache from the step before.
Bytes model (bench/NOTES.md): p read+write, g read, m and v read+write: 7 x element size
(28 B/param in fp32). Writes bench-{device}.json / .csv / .md and the plots under the output dir.

    python bench/bench.py [--device cpu|cuda] [--sections ...] [--sizes LO HI] [--providers ...]
                          [--dtype fp32|bf16|fp16] [--budget S] [--out DIR]
"""
from __future__ import annotations

import argparse
import csv
import datetime
import itertools
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fused_adam  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SECTIONS = ("sweep", "models", "small", "precision")
CEILING_SIZES = (13, 16)  # log2 elements of the precision section's cache-resident runs
TORCH_PROVIDERS = {"for-loop": dict(foreach=False), "foreach": dict(foreach=True),
                   "fused": dict(fused=True)}
COPY = "device copy"
REF = "torch fused"  # what the ratios are against
STREAM = "in-place stream"
WARMUP = 3
MAX_COPIES = 32  # rotating optimizer copies for small sizes; more only costs set-up time


# ---- shapes ----------------------------------------------------------------------------------

def gpt2_124m():
    """GPT-2 small (124M params, lm_head tied to wte): 148 tensors."""
    d, layers = 768, 12
    shapes = [(50257, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,),
                   (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def llama_1b(scale=1):
    """Llama-3.2-1B (tied embeddings, GQA 32/8 heads, SwiGLU): 146 tensors, 1.24B params.
    `scale` divides the widths (not the vocabulary or the depth): scale 4 keeps the tensor count
    and gives 126M params, which a 2-core CPU steps in tens of milliseconds."""
    d, ffn, kv, vocab = 2048 // scale, 8192 // scale, 512 // scale, 128256
    shapes = [(vocab, d)]
    for _ in range(16):
        shapes += [(d,), (d, d), (kv, d), (kv, d), (d, d), (d,), (ffn, d), (ffn, d), (d, ffn)]
    return shapes + [(d,)]


def vit_b16():
    """ViT-B/16 at 224x224 with a 1000-class head: 152 tensors, 86.6M params."""
    d = 768
    shapes = [(d, 3, 16, 16), (d,), (1, 1, d), (1, 197, d)]
    for _ in range(12):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,),
                   (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (1000, d), (1000,)]


def models(device):
    scale = 1 if device.type == "cuda" else 4
    return {"gpt2_124m": gpt2_124m(),
            "llama_1b" if scale == 1 else "llama_1b/4": llama_1b(scale),
            "vit_b16": vit_b16(),
            "many_16k": [(1 << 14,)] * 1024}


def small_1000():
    """1000 tensors of 1 to 4096 elements (seeded), 2.0M params in all."""
    gen = torch.Generator().manual_seed(1)
    return [(int(n),) for n in torch.randint(1, 4097, (1000,), generator=gen)]


def layerwise_groups(params, groups=24):
    """Layer-wise lr decay with per-group weight decay: `groups` param groups (params dealt
    round-robin), lr 1e-3 * 0.9**k, weight decay 0.01 * (k % 3), as fine-tuning recipes set."""
    return [dict(params=params[k::groups], lr=1e-3 * 0.9**k, weight_decay=0.01 * (k % 3))
            for k in range(groups)]


# ---- providers -------------------------------------------------------------------------------

class Provider:
    """A labelled optimizer constructor and its bytes/param."""

    def __init__(self, label, make, dtype, bytes_per_param):
        self.label, self.make, self.dtype, self.bytes_per_param = label, make, dtype, bytes_per_param


class DeviceCopy:
    """`dst.copy_(src)` over as many elements as the params: the streaming reference."""

    def __init__(self, params):
        n = sum(p.numel() for p in params)
        self.src = torch.ones(n, dtype=params[0].dtype, device=params[0].device)
        self.dst = torch.empty_like(self.src)

    def step(self):
        self.dst.copy_(self.src)


class InPlaceStream:
    """`buf.add_(1)` over as many fp32 elements as the params: the precision section's reference,
    8 B/element read and written in place, as a step reads and writes its operands."""

    def __init__(self, params):
        self.buf = torch.zeros(sum(p.numel() for p in params), device=params[0].device)

    def step(self):
        self.buf.add_(1.0)


def providers(device, dtype, keys):
    """Ours once per backend available here, torch's three implementations, the device copy."""
    size = torch.finfo(dtype).bits // 8
    out = {}
    for b in fused_adam.available_backends(device):
        if keys is None or b in keys:
            out[f"fused_adam[{b}]"] = Provider(
                f"fused_adam[{b}]", lambda ps, b=b: fused_adam.FusedAdamW(ps, lr=1e-3, backend=b),
                dtype, 7 * size)
    for key, kw in TORCH_PROVIDERS.items():
        if keys is None or key in keys:
            out[f"torch {key}"] = Provider(
                f"torch {key}", lambda ps, kw=kw: torch.optim.AdamW(ps, lr=1e-3, **kw), dtype, 7 * size)
    out[COPY] = Provider(COPY, DeviceCopy, dtype, 2 * size)
    return out


def precision_providers():
    """The mixed-precision options (`auto` backend), torch fused on fp32 and bf16 params, and
    the in-place stream. Bytes: each operand read, and written where the step writes it."""
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    ours = lambda **kw: lambda ps: fused_adam.FusedAdamW(ps, lr=1e-3, **kw)  # noqa: E731
    torch_fused = lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)  # noqa: E731
    table = [
        ("fused_adam fp32", ours(), fp32, 28),  # p r/w 8, g 4, m, v r/w 16
        ("fused_adam fp32, bf16 states", ours(state_dtype=bf16), fp32, 20),  # m, v r/w 8
        # bf16 p r/w 4, g 2, fp32 master r/w 8, m, v r/w 16 (the param is read too: a write by
        # user code since the last step wins over the master)
        ("fused_adam bf16 + fp32 master", ours(master_weights=True), bf16, 32),
        ("fused_adam bf16, stochastic rounding, fp32 states",
         ours(stochastic_rounding=True, state_dtype=fp32), bf16, 22),  # p r/w 4, g 2, m, v 16
        ("fused_adam bf16, stochastic rounding", ours(stochastic_rounding=True), bf16, 14),
        ("fused_adam bf16", ours(), bf16, 14),  # p r/w 4, g 2, m, v r/w 8
        # 8-bit states: codes r/w 4 (+ a 4-byte scale per 256 elements r/w, 0.03)
        ("fused_adam fp32, 8-bit states", ours(state_dtype="int8"), fp32, 16),
        ("fused_adam bf16 + fp32 master, 8-bit states",
         ours(master_weights=True, state_dtype="int8"), bf16, 20),  # p r/w 4, g 2, master 8
        ("fused_adam fp16", ours(), fp16, 14),  # as bf16: fp16 conversions (NOTES 19)
        ("torch fused", torch_fused, fp32, 28),
        ("torch fused, bf16", torch_fused, bf16, 14),
        ("torch fused, fp16", torch_fused, fp16, 14),
        (STREAM, InPlaceStream, fp32, 8),
    ]
    return {label: Provider(label, make, dtype, nbytes) for label, make, dtype, nbytes in table}


# ---- timing ----------------------------------------------------------------------------------

def last_level_cache(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    try:
        text = Path("/sys/devices/system/cpu/cpu0/cache/index3/size").read_text().strip()
        return int(text.rstrip("K")) * 1024
    except (OSError, ValueError):
        return 32 << 20


def free_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class Clock:
    """Seconds of one call. GPU: events around it after zeroing a buffer twice the L2 size
    (at least 256 MB, as triton.testing.do_bench), so the step starts from DRAM. `host`: the
    time until the call returns, the queue drained before and after (launch + Python cost)."""

    def __init__(self, device, host=False):
        self.cuda, self.host = device.type == "cuda", host
        if self.cuda and not host:
            self.flush = torch.empty(max(256 << 20, 2 * last_level_cache(device)) // 4,
                                     dtype=torch.int32, device=device)
            self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def __call__(self, fn) -> float:
        if self.cuda and not self.host:
            self.flush.zero_()
            self.events[0].record()
            fn()
            self.events[1].record()
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1]) / 1e3
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - t0
        if self.cuda:
            torch.cuda.synchronize()
        return elapsed


def reps_for(round_s, device, budget):
    """Timed rounds: enough to fill `budget` seconds, at least 11 (CPU) / 25 (GPU), at most 201."""
    lo = 25 if device.type == "cuda" else 11
    return int(min(201, max(lo, budget / max(round_s, 1e-6)))) | 1  # odd: a true median


def make_init(shapes, device):
    """fp32 params and grads (seed 0) that every provider copies."""
    gen = torch.Generator(device).manual_seed(0)
    params = [torch.randn(s, device=device, generator=gen) for s in shapes]
    return params, [torch.randn(s, device=device, generator=gen) * 1e-2 for s in shapes]


class FreshGrads:
    """A training loop's grads: before each step `zero_grad()` (set_to_none, torch's default)
    and grads newly made, as autograd makes them after it (untimed), then the timed step."""

    def __init__(self, opt):
        self.opt = opt
        self.params = [p for group in opt.param_groups for p in group["params"]]
        self.grads = [p.grad.clone() for p in self.params]
        self.step = opt.step

    def refresh(self):
        self.opt.zero_grad()
        for p, g in zip(self.params, self.grads):
            p.grad = g.clone()


def build(provider, init, copies, fresh=False):
    """`copies` optimizers over copies of the same params and grads (FreshGrads of them with
    `fresh`), warmed up; also returns the seconds of one warm-up step."""
    opts = []
    for _ in range(copies):
        params = [p.to(provider.dtype, copy=True).requires_grad_() for p in init[0]]
        for p, g in zip(params, init[1]):
            p.grad = g.to(provider.dtype, copy=True)
        opts.append(FreshGrads(provider.make(params)) if fresh else provider.make(params))
    t0 = time.perf_counter()
    for _ in range(WARMUP):  # state allocation, kernel compilation, first grad copy-in
        for opt in opts:
            if fresh:
                opt.refresh()
            opt.step()
    if init[0][0].is_cuda:
        torch.cuda.synchronize()
    return opts, (time.perf_counter() - t0) / (WARMUP * copies)


def measure(section, case, shapes, device, table, budget, host=False, fresh=False):
    """Rows for one case: each provider's median step time, interleaved round by round. Where
    every provider at once would not fit in memory (GPT-2 on this 24 GiB VM, a 1B model on one
    GPU), each runs beside torch fused in turn, its ratio against torch fused's times of those
    rounds (torch fused's row: all its rounds); else each alone.
    `fresh`: each step after zero_grad() with grads made anew (FreshGrads)."""
    n = sum(math.prod(s) for s in shapes)
    work = max(p.bytes_per_param for p in table.values()) * n
    copies = 1 if host else max(1, min(MAX_COPIES, math.ceil(4 * last_level_cache(device) / work)))
    # p, g, m, v (fp32: 16 B/param) and the for-loop's temporaries, with room to spare
    fits = lambda providers: 3 * providers * copies * 16 * n < free_memory(device)  # noqa: E731
    together = fits(len(table))
    paired = not together and REF in table and fits(2)
    if together:
        groups = [table]
    elif paired:  # each provider beside torch fused, its ratio's reference:
        # timed apart, the two saw different states of this VM's memory (bench/NOTES.md 21)
        groups = [{REF: table[REF], k: v} for k, v in table.items() if k != REF]
    else:
        groups = [{k: v} for k, v in table.items()]
    clock, times, init = Clock(device, host), {}, make_init(shapes, device)
    ref_times = {}  # per provider: torch fused's times in its group
    for group in groups:
        built = {label: build(p, init, copies, fresh) for label, p in group.items()}
        reps = reps_for(sum(t for _, t in built.values()), device, budget)
        cycles = {label: itertools.cycle(opts) for label, (opts, _) in built.items()}
        group_times = {label: [] for label in group}
        order = random.Random(0)
        for _ in range(reps):
            # A new order each round: on the 2-core VM a step's time depends on what ran just
            # before it (bench/NOTES.md 10), which a fixed order would charge to one provider.
            for label in order.sample(list(cycles), len(cycles)):
                opt = next(cycles[label])
                if fresh:
                    opt.refresh()
                group_times[label].append(clock(opt.step))
        for label, t in group_times.items():
            times.setdefault(label, []).extend(t)
            if paired and label != REF:
                ref_times[label] = group_times[REF]
        del built, cycles
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [dict(section=section, case=case, provider=label, tensors=len(shapes), params=n,
                 dtype=str(table[label].dtype).removeprefix("torch."),
                 bytes_per_param=table[label].bytes_per_param,
                 median_ms=statistics.median(t) * 1e3, min_ms=min(t) * 1e3, reps=len(t),
                 copies=copies, interleaved=together or paired, host_time=host)
            for label, t in times.items()]
    for r in rows:
        r["gbps"] = r["bytes_per_param"] * n / (r["median_ms"] / 1e3) / 1e9
    by = {r["provider"]: r for r in rows}
    stream = by.get(COPY) or by.get(STREAM)  # % of it: the row's time at that rate / its time
    for r in rows:
        r["pct_copy"] = 100 * r["gbps"] / stream["gbps"] if stream else None
        for ref in ("fused", "foreach"):
            other = by.get(f"torch {ref}")
            r[f"vs_{ref}"] = other["median_ms"] / r["median_ms"] if other else None
        mine = ref_times.get(r["provider"])
        if mine:  # paired: against the reference's times in the same rounds
            r["vs_fused"] = statistics.median(mine) * 1e3 / r["median_ms"]
    return rows


# ---- report ----------------------------------------------------------------------------------

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
                                text=True, cwd=ROOT).stdout.strip()
        # A lent GPU box gets the working tree over an older checkout (its HEAD was a session's
        # first commit, 2026-11-27): then the code is not that commit's, and says so.
        if subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "fused_adam", "csrc"],
                          cwd=ROOT).returncode == 1:
            commit += "+changes"
    except OSError:
        commit = ""
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 - reported, not needed
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"{_cpu_model()}, {torch.get_num_threads()} threads")
    return dict(device=name, device_type=device.type, threads=torch.get_num_threads(),
                torch=torch.__version__,
                triton=triton_version, python=platform.python_version(), commit=commit,
                date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def _fmt(value, spec, suffix=""):
    return "" if value is None else f"{value:{spec}}{suffix}"


def markdown(rows):
    """One table per section, in the order run."""
    out = []
    for section in dict.fromkeys(r["section"] for r in rows):
        out += [f"### {section}", "",
                "| case | provider | B/param | median ms | GB/s | % copy | vs fused | vs foreach |",
                "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["section"] == section):
            case = f"{r['case']} ({r['tensors']} x, {r['params'] / 1e6:.3g}M {r['dtype']})"
            ms = f"{r['median_ms']:.3f}" + (" host" if r["host_time"] else "")
            out.append(f"| {case} | {r['provider']} | {r['bytes_per_param']} | {ms} | "
                       f"{r['gbps']:.1f} | {_fmt(r['pct_copy'], '.0f', '%')} | "
                       f"{_fmt(r['vs_fused'], '.2f', 'x')} | {_fmt(r['vs_foreach'], '.2f', 'x')} |")
        out.append("")
    return "\n".join(out)


def write(results, out: Path, plots=True):
    """bench-{device}.json (environment + rows), .csv (one line per row, environment columns
    repeated), .md (header + tables) and the plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"bench-{results['device_type']}"
    stem.with_suffix(".json").write_text(json.dumps(results, indent=1))
    env = {k: v for k, v in results.items() if k != "rows"}
    with stem.with_suffix(".csv").open("w", newline="") as f:
        fields = [*env, *results["rows"][0]]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in results["rows"]:
            writer.writerow(env | r)
    stem.with_suffix(".md").write_text(header(results) + "\n\n" + markdown(results["rows"]))
    paths = [stem.with_suffix(s) for s in (".json", ".csv", ".md")]
    if not plots:
        return paths
    try:
        from bench import plots as plotting
    except ImportError as exc:  # a GPU box without matplotlib still gets the tables
        print(f"plots skipped: {exc}")
        return paths
    return paths + plotting.plot(results, out)


def header(results):
    return (f"{results['device']}, torch {results['torch']}, triton {results['triton']}, "
            f"{results['date']}, commit {results['commit']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--sizes", nargs=2, type=int, metavar=("LO", "HI"),
                        help="sweep 2**LO .. 2**HI elements (CPU default 12 26, GPU 12 28)")
    parser.add_argument("--providers", nargs="+", metavar="NAME",
                        choices=[*fused_adam.backends.NAMES[1:], *TORCH_PROVIDERS],
                        help="backends of ours and torch implementations to run (default all)")
    parser.add_argument("--dtype", default="fp32", choices=DTYPES,
                        help="param (and state) dtype of sweep, models, small")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds of timed rounds per case (CPU 1, GPU 0.5); min reps apply")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "bench" / "results"))
    parser.add_argument("--no-plots", action="store_true",
                        help="tables only (gpu-check: bench/report.py draws the plots later)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    lo, hi = args.sizes or (12, 28 if gpu else 26)
    budget = args.budget or (0.5 if gpu else 1.0)
    dtype = DTYPES[args.dtype]
    table = providers(device, dtype, args.providers)
    rows, out = [], Path(args.out)
    results = dict(environment(device), rows=rows)

    def run(section, case, shapes, table_, host=False, fresh=False):
        t0 = time.perf_counter()
        new = measure(section, case, shapes, device, table_, budget, host, fresh)
        print(f"{section:9} {case:14} {time.perf_counter() - t0:6.1f} s  " + "  ".join(
            f"{r['provider']} {r['median_ms']:.3f}" for r in new), flush=True)
        rows.extend(new)
        write(results, out, plots=False)  # as it goes: a run cut short keeps every finished case

    for section in dict.fromkeys(args.sections):  # in the order asked: gpu-check puts value first
        if section == "sweep":
            for k in range(lo, hi + 1):
                run("sweep", f"2^{k}", [(1 << k,)], table)
        elif section == "models":
            for name, shapes in models(device).items():
                run("models", name, shapes, table)
            # torch's default loop: zero_grad() sets grads to None, backward makes new ones
            run("models", "gpt2_124m, zero_grad()", gpt2_124m(),
                {k: v for k, v in table.items() if k != COPY}, fresh=True)
        elif section == "small":
            no_copy = {k: v for k, v in table.items() if k != COPY}
            run("small", "1000 x 1-4K", small_1000(), no_copy, host=True)
            run("small", "24 groups, 1000 x 1-4K", small_1000(),
                {k: Provider(p.label, lambda ps, make=p.make: make(layerwise_groups(ps)), p.dtype,
                             p.bytes_per_param) for k, p in no_copy.items()}, host=True)
        else:
            run("precision", "2^24", [(1 << 24,)], precision_providers())
            if device.type == "cpu":  # each row's compute ceiling: its step in cache (one copy),
                # one thread, per element from two sizes (the fixed cost cancels); 2^16 is one
                # task of the CPU kernel
                threads = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    for k in CEILING_SIZES:
                        run("ceiling", f"2^{k}", [(1 << k,)], precision_providers(), host=True)
                finally:
                    torch.set_num_threads(threads)
    print(header(results))
    print(markdown(rows))
    for path in write(results, out, plots=not args.no_plots):
        print("wrote", path)
    return results


if __name__ == "__main__":
    main()
