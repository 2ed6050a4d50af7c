"""The optimizer step under the engines that own the params: FSDP2 (`fully_shard`, DTensor local
shards) and ZeroRedundancyOptimizer with `parameters_as_bucket_view` (params are views into its
buckets; its local optimizer's step is timed, not the broadcast), two gloo processes on this
machine. In each process ours (FusedAdamW, auto backend)
and torch.optim.AdamW(fused=True) step the same local shards of two identical models; only
`step()` is timed (the grads come from one backward and stay), interleaved round by round,
medians per rank. Ours steps such params where they live: 28 B/param, no copy in or out.
Writes bench-distributed-{device}.json / .md under the output dir.

    python bench/distributed.py [--layers 8] [--width 1024] [--reps 30] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import fused_adam  # noqa: E402

WORLD = 2


def _model(layers, width):
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(width, width) for _ in range(layers)))


def _grads(model, width):
    model(torch.randn(4, width)).square().mean().backward()


def _fsdp2(layers, width):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    made = []
    for _ in range(2):
        model = _model(layers, width)
        for layer in model:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        _grads(model, width)
        made.append(model)
    return (fused_adam.FusedAdamW(made[0].parameters(), lr=1e-3),
            torch.optim.AdamW(made[1].parameters(), lr=1e-3, fused=True))


def _zero(layers, width):
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    made = []
    for cls, kw in ((fused_adam.FusedAdamW, {}), (torch.optim.AdamW, {"fused": True})):
        model = DDP(_model(layers, width))
        opt = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=cls, lr=1e-3,
                                      parameters_as_bucket_view=True, **kw)
        _grads(model, width)
        opt.step()  # ZeRO's own step: the broadcast of the buckets is the same for both
        made.append(opt.optim)  # the optimizer over this rank's shard, as ZeRO steps it
    return tuple(made)


def _local_params(opt):
    return sum(getattr(p, "_local_tensor", p).numel()
               for g in opt.param_groups for p in g["params"])


def _worker(rank, args, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank,
                            world_size=WORLD)
    try:
        torch.set_num_threads(max(1, (os.cpu_count() or WORLD) // WORLD))
        rows = []
        for name, make in (("FSDP2", _fsdp2), ("ZeRO bucket views", _zero)):
            ours, ref = make(args.layers, args.width)
            for opt in (ours, ref):  # warm-up: states, one-time checks
                opt.step()
            times = {"ours": [], "torch fused": []}
            for _ in range(args.reps):
                for label, opt in (("ours", ours), ("torch fused", ref)):
                    dist.barrier()
                    t0 = time.perf_counter()
                    opt.step()
                    times[label].append(time.perf_counter() - t0)
            n = _local_params(ours)
            row = dict(engine=name, rank=rank, local_params=n,
                       **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()})
            row["vs_fused"] = row["torch fused_ms"] / row["ours_ms"]
            row["ours_gbps_28B"] = 28 * n / (row["ours_ms"] / 1e3) / 1e9
            rows.append(row)
        Path(out, f"{rank}.json").write_text(json.dumps(rows))
        time.sleep(0.1)  # let gloo's threads free their last work before exit
    finally:
        dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = parser.parse_args(argv)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a box with no network: loopback exists
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.spawn(_worker, args=(args, tmp), nprocs=WORLD)
        rows = [r for rank in range(WORLD) for r in json.loads(Path(tmp, f"{rank}.json").read_text())]
    lines = [f"{WORLD} gloo processes on CPU, {args.layers} x Linear({args.width}, {args.width}), "
             f"torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
             "", "| engine | rank | local params | ours ms | torch fused ms | ours vs fused | "
             "ours GB/s (28 B/param) |", "|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['engine']} | {r['rank']} | {r['local_params'] / 1e6:.2f}M | {r['ours_ms']:.2f} | "
              f"{r['torch fused_ms']:.2f} | {r['vs_fused']:.2f}x | {r['ours_gbps_28B']:.1f} |"
              for r in rows]
    print("\n".join(lines))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench-distributed-cpu.json").write_text(json.dumps(dict(args=vars(args), rows=rows),
                                                               indent=1))
    (out / "bench-distributed-cpu.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
