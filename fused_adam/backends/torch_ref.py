"""Reference backend: PyTorch ops on the flat buffers, op for op as `_single_tensor_adam`.

It is the oracle the kernels are tested against and the CPU fallback. On CPU each op below is
a multi-threaded vectorized ATen kernel, so one call per flat buffer replaces torch's per-tensor
loop. On CPU, temporaries live in a per-thread workspace: a fresh 64 MB tensor per step costs page
faults on every call (glibc hands blocks over 32 MB back to the kernel), about 5 ms of a
16M-element step on the 2-core CI machine. Other devices allocate them fresh: their caching
allocators already reuse blocks, and a workspace there would hold the largest step's temporaries
for the life of the process (~5 GB of GPU memory after a 1B-parameter step). Under torch.compile
they are fresh too: the compiled graph plans its own buffers (and dynamo cannot trace the cache).

When every tensor is fp32 (or every one float64) the ops run on them directly: bit-identical to
torch.optim. Any other mix (bf16/fp16 params, grads or states, an fp32 master copy) runs the same
ops on fp32 copies and rounds each result once on the way back, which is the kernels' contract.
8-bit states (fused_adam/quantize.py) are decoded into fp32 copies and encoded back with their
blocks' new absmax.
"""
from __future__ import annotations

import threading

import torch

from .. import quantize
from ..functional import HYPER_FIELDS, SEGMENT_FIELDS

_workspace = threading.local()
# 2M elements: per chunk ~15 ops of ~5 us host time against ~3 ms of work on 2 cores (<3%); its
# temporaries, 7 at most (fp32 working copies of every operand), take 56 MB.
CHUNK = 1 << 21


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _scratch(like: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(like.shape, dtype=dtype, device=like.device)
    key = (dtype, slot)
    cache = getattr(_workspace, "buffers", None)
    if cache is None:
        cache = _workspace.buffers = {}
    buf = cache.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = cache[key] = torch.empty(like.numel(), dtype=dtype, device=like.device)
    return buf[: like.numel()].view_as(like)


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
               exp_avg_sq_absmaxes, hyper, segments, *, stochastic, found_inf):
    """The registry's interface, segment by segment. Host rows arrive as Python floats (the ops
    then take them as torch.optim's do); rows on a GPU, or in a compiled step, as 0-dim tensors,
    read by the ops there: no host sync, no graph break. On CPU a long segment is stepped in
    chunks of CHUNK elements: the workspace then never holds more than 7 chunk-sized temporaries
    (~56 MB), whatever the size of the largest segment stepped so far (it held 1.28 GiB after
    one 128 MiB bf16 param)."""
    rows = (hyper.tolist() if hyper.device.type == "cpu" and not torch.compiler.is_compiling()
            else None)
    if stochastic and rows is None:
        raise ValueError("stochastic rounding needs the step count on the host")
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters)
    scales = (exp_avg_absmaxes, exp_avg_sq_absmaxes)
    width = len(SEGMENT_FIELDS)
    for k in range(0, len(segments), width):
        buffer, start, length, row, index_base = segments[k:k + width]
        if not length:
            continue
        # (a strided tensor, which the functional API takes, is stepped whole in its shape)
        flat = all(t.is_contiguous() for t in (lst[buffer] for lst in lists if lst))
        views = [None if not lst else lst[buffer].view(-1)[start:start + length] if flat else
                 lst[buffer] for lst in lists]
        absmax = [lst[buffer][start // quantize.QBLOCK:] if lst else None for lst in scales]
        work = torch.float64 if params[buffer].dtype == torch.float64 else torch.float32
        values = rows[row] if rows is not None else hyper[row].to(work).unbind()
        scalars = dict(zip(HYPER_FIELDS, values))
        key = scalars.pop("sr_key")
        key = int(key) if stochastic else None
        step = CHUNK if views[0].device.type == "cpu" and flat else length  # (whole blocks)
        for lo in range(0, length, step):
            _step(*(None if v is None else v[lo:lo + step] for v in views),
                  *(None if a is None else a[lo // quantize.QBLOCK:] for a in absmax), sr_key=key,
                  index_base=index_base + lo, found_inf=found_inf, **scalars)


def _step(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax,
          exp_avg_sq_absmax, *, sr_key, index_base, found_inf, **scalars):
    """`scalars`: the row's fields (HYPER_FIELDS but sr_key), floats or 0-dim device tensors.
    The absmaxes (8-bit states) start at the segment's first block and may run past its end."""
    if exp_avg_absmax is not None:
        exp_avg_absmax = exp_avg_absmax[:quantize.blocks(param.numel())]
        exp_avg_sq_absmax = exp_avg_sq_absmax[:quantize.blocks(param.numel())]
    outputs = [t for t in (param, exp_avg, exp_avg_sq, max_exp_avg_sq, master, exp_avg_absmax,
                           exp_avg_sq_absmax) if t is not None]
    saved = None if found_inf is None else [t.clone() for t in outputs]
    if exp_avg_absmax is None:
        _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, sr_key, index_base,
                scalars)
    else:  # fp32 moments decoded, stepped as fp32 states, encoded with the blocks' new absmax
        moments = {"exp_avg": (exp_avg, exp_avg_absmax), "exp_avg_sq": (exp_avg_sq, exp_avg_sq_absmax)}
        work = {key: quantize.dequantize(codes, absmax, key) for key, (codes, absmax) in moments.items()}
        _update(param, grad, work["exp_avg"], work["exp_avg_sq"], None, master, sr_key, index_base,
                scalars)
        for key, (codes, absmax) in moments.items():  # (blocks in the codes' memory order)
            quantize.store(work[key], codes, absmax, key)
    if saved is not None:  # a skipped step: every output as it was, decided on the device
        for out, old in zip(outputs, saved):
            torch.where(found_inf != 0, old, out, out=out)


def _update(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, sr_key, index_base, scalars):
    tensors = [param, grad, exp_avg, exp_avg_sq] + ([] if max_exp_avg_sq is None else [max_exp_avg_sq])
    if master is None and len({t.dtype for t in tensors}) == 1 and param.dtype in (torch.float32, torch.float64):
        return _adam_ops(*tensors[:4], max_exp_avg_sq, **scalars)
    if master is not None:  # user code wrote the param since: that write wins (csrc/adam_math.h)
        torch.where(master.to(param.dtype) == param, master, param.to(torch.float32), out=master)
    # fp32 working copies (slot 0 is _adam_ops' own temporary); the master copy is the param.
    work = [master if master is not None and i == 0 else
            t if t.dtype == torch.float32 else _scratch(t, i + 1, torch.float32).copy_(t)
            for i, t in enumerate(tensors)]
    _adam_ops(*work[:4], work[4] if max_exp_avg_sq is not None else None, **scalars)
    if sr_key is not None:
        param.view(torch.int16).copy_(_bf16_stochastic(work[0], sr_key, index_base))
        tensors, work = tensors[1:], work[1:]
    for dst, src in zip(tensors, work):
        if dst is not src and dst is not grad:
            dst.copy_(src)  # rounds to nearest even, once


_M32 = 0xFFFFFFFF


def _lowbias32(x: torch.Tensor) -> torch.Tensor:
    """csrc/adam_math.h's hash on int64 tensors holding uint32 values (products wrap, then mask)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _bf16_stochastic(x: torch.Tensor, key: int, index_base: int) -> torch.Tensor:
    """bf16 bit patterns (as int16) of fp32 `x`, stochastically rounded: csrc/adam_math.h."""
    index = torch.arange(index_base, index_base + x.numel(), device=x.device).view(x.shape)
    hi = ((index >> 32) * 0x9E3779B9) & _M32
    random = _lowbias32(key ^ _lowbias32((index & _M32) ^ hi))
    bits = x.view(torch.int32).to(torch.int64) & _M32
    special = (bits & 0x7F800000) == 0x7F800000
    kept = (bits >> 16) | torch.where((bits & 0xFFFF) != 0, 0x40, 0)
    return torch.where(special, kept, (bits + (random & 0xFFFF)) >> 16).to(torch.int16)


def _adam_ops(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, grad_mult, decay,
              weight_decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps):
    """torch.optim's ops. With device values (0-dim tensors) the ops that take only a number are
    spelled out (one rounding each, as csrc/adam_math.h) and the weight-decay branches become
    selects: the host cannot look at them without a sync."""
    tmp = _scratch(param, 0, param.dtype)
    on_device = torch.is_tensor(eps)
    if on_device or grad_mult != 1:  # clip_grad_norm_'s multiply, maximize's negation: exact
        grad = torch.mul(grad, grad_mult, out=tmp)
    if on_device:
        grad = torch.where(weight_decay != 0, torch.addcmul(grad, param, weight_decay), grad)
        param.mul_(decay)  # 1 without decoupled decay: exact
    elif weight_decay != 0:
        grad = torch.add(grad, param, alpha=weight_decay, out=tmp)
    elif decay != 1:
        param.mul_(decay)
    exp_avg.lerp_(grad, lerp_weight)
    if on_device:
        exp_avg_sq.mul_(beta2).addcmul_(grad * one_minus_beta2, grad)
    else:
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=one_minus_beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        second = torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    denom = torch.sqrt(second, out=tmp).div_(bc2_sqrt).add_(eps)
    if on_device:  # addcdiv_ takes a number: its op order, spelled out
        update = torch.mul(exp_avg, neg_step_size, out=_scratch(param, 6, param.dtype))
        param.add_(update.div_(denom))
    else:
        param.addcdiv_(exp_avg, denom, value=neg_step_size)
