"""DDP, FSDP2 and distributed checkpoints on CPU: two gloo processes per scenario, each training
the same model with torch.optim.AdamW and with ours; the parent compares what they saved."""
import os
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fused_adam
from conftest import TOLERANCE

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD, STEPS, LR = 2, 5, 1e-2
# Ours against torch.optim in the same engine: bit-identical for the torch backend, the kernels'
# 1-ulp sqrt difference grown over a few training steps otherwise.
BACKENDS = fused_adam.available_backends("cpu")


def _tolerance(backend):
    return TOLERANCE[(backend, "training loop")]


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4))


def _batches(rank):
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    return [torch.randn(6, 8, generator=gen) for _ in range(STEPS)]


def _train(model, opt, batches):
    for x in batches:
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def _full(model):
    return [(p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for p in model.parameters()]


def _optimizer(backend, params):
    if backend == "reference":
        return torch.optim.AdamW(params, lr=LR)
    return fused_adam.FusedAdamW(params, lr=LR, backend=backend)


def _ddp(rank, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    results = {}
    runs = [("reference", "after", {})] + [
        (b, order, kw) for b in BACKENDS
        for order, kw in (("after", {}), ("before", {}), ("after", {"gradient_as_bucket_view": True}))]
    for backend, order, kw in runs:
        model = _model()
        opt = _optimizer(backend, model.parameters()) if order == "before" else None
        wrapped = DDP(model, **kw)
        opt = opt or _optimizer(backend, wrapped.parameters())
        _train(wrapped, opt, _batches(rank))
        results[(backend, order, tuple(kw))] = _full(model)
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def _zero(rank, out):
    """ZeroRedundancyOptimizer building our optimizer over its shard of the params; with
    parameters_as_bucket_view it re-points the params into its buckets afterwards and
    broadcasts the buckets."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP
    results = {}
    for backend in ("reference", *BACKENDS):
        for as_bucket_view in (False, True):
            model = _model()
            wrapped = DDP(model)
            kw = {} if backend == "reference" else {"backend": backend}
            opt = ZeroRedundancyOptimizer(
                wrapped.parameters(), lr=LR, parameters_as_bucket_view=as_bucket_view,
                optimizer_class=torch.optim.AdamW if backend == "reference" else fused_adam.FusedAdamW,
                **kw)
            _train(wrapped, opt, _batches(rank))
            results[(backend, as_bucket_view)] = _full(model)
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def _fsdp(rank, out):
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    import torch.distributed.checkpoint as dcp

    mesh = init_device_mesh("cpu", (WORLD,))

    def sharded(mp):
        model = _model()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh, mp_policy=mp)
        return fully_shard(model, mesh=mesh, mp_policy=mp)

    results = {}
    policies = {"fp32": MixedPrecisionPolicy(),
                "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)}
    for name, mp in policies.items():
        for backend in ("reference", *BACKENDS):
            model = sharded(mp)
            opt = _optimizer(backend, model.parameters())
            _train(model, opt, _batches(rank))
            p = next(model.parameters())
            assert type(p).__name__ == "DTensor" and type(opt.state[p]["exp_avg"]) is type(p)
            results[(name, backend)] = _full(model) + [
                opt.state[p][k].full_tensor() for k in ("exp_avg", "exp_avg_sq")]

    # Distributed checkpoint: save after 3 steps, train 2 more; a fresh model and optimizer
    # restored from the checkpoint must then retrace those 2 steps exactly.
    batches = _batches(rank)
    model = sharded(policies["fp32"])
    opt = fused_adam.FusedAdamW(model.parameters(), lr=LR)
    _train(model, opt, batches[:3])
    ckpt = os.path.join(out, "ckpt")
    dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=ckpt)
    _train(model, opt, batches[3:])
    fresh = sharded(policies["fp32"])
    fresh_opt = fused_adam.FusedAdamW(fresh.parameters(), lr=LR)
    state = {"model": fresh.state_dict(), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
    dcp.load(state, checkpoint_id=ckpt)
    fresh.load_state_dict(state["model"])
    set_optimizer_state_dict(fresh, fresh_opt, state["optim"])
    _train(fresh, fresh_opt, batches[3:])
    results["resumed"], results["continued"] = _full(fresh), _full(model)
    torch.save(results, os.path.join(out, f"{rank}.pt"))


def _worker(rank, scenario, out):
    dist.init_process_group("gloo", init_method=f"file://{out}/init", rank=rank,
                            world_size=WORLD)
    try:
        globals()[scenario](rank, out)
        time.sleep(0.1)  # let gloo's threads free their last work before exit (README, DDP section)
    finally:
        dist.destroy_process_group()


def _run(scenario, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(scenario, str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)]


def _close(ours, ref, backend):
    for a, b in zip(ours, ref, strict=True):
        if backend in ("torch", "reference"):
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a.float(), b.float(), **_tolerance(backend))


def test_ddp_matches_torch_adamw_on_every_rank(tmp_path):
    ranks = _run("_ddp", tmp_path)
    for results in ranks:
        ref = results[("reference", "after", ())]
        for (backend, _, _), params in results.items():
            _close(params, ref, backend)
    for key in ranks[0]:  # DDP keeps the replicas identical
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)


def test_zero_redundancy_optimizer_of_ours_matches_torch_adamw(tmp_path):
    ranks = _run("_zero", tmp_path)
    for results in ranks:
        for (backend, as_bucket_view), params in results.items():
            _close(params, results[("reference", as_bucket_view)], backend)
    for key in ranks[0]:  # every rank broadcasts its shard: the replicas are identical
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)


def test_fsdp2_matches_torch_adamw_and_resumes_from_a_distributed_checkpoint(tmp_path):
    ranks = _run("_fsdp", tmp_path)
    for results in ranks:
        for policy in ("fp32", "bf16"):
            ref = results[(policy, "reference")]
            for backend in BACKENDS:
                _close(results[(policy, backend)], ref, backend)
        for a, b in zip(results["resumed"], results["continued"], strict=True):
            assert torch.equal(a, b)
    for key in ranks[0]:  # full tensors, gathered: the same on both ranks
        for a, b in zip(ranks[0][key], ranks[1][key]):
            assert torch.equal(a, b)
