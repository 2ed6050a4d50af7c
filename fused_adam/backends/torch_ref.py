"""Reference backend: PyTorch ops on the flat buffers, op for op as `_single_tensor_adam`.

It is the oracle the kernels are tested against and the CPU fallback. On CPU each op below is
a multi-threaded vectorized ATen kernel, so one call per flat buffer replaces torch's per-tensor
loop. The one temporary (the effective grad, then the denominator) lives in a workspace that is
kept per device: a fresh 64 MB tensor per step costs page faults on every call (glibc hands blocks
over 32 MB back to the kernel), about 5 ms of a 16M-element step on the 2-core CI machine.
"""
from __future__ import annotations

import threading

import torch

_workspace = threading.local()


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    return None


def _scratch(like: torch.Tensor) -> torch.Tensor:
    key = (like.device, like.dtype)
    cache = _workspace.__dict__.setdefault("buffers", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = cache[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    return buf[: like.numel()].view_as(like)


def adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, decay, weight_decay,
               lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
               maximize, decoupled):
    tmp = _scratch(param)
    if maximize:
        grad = torch.neg(grad, out=tmp)
    if weight_decay != 0:
        if decoupled:
            param.mul_(decay)
        else:
            grad = torch.add(grad, param, alpha=weight_decay, out=tmp)
    exp_avg.lerp_(grad, lerp_weight)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=one_minus_beta2)
    second = exp_avg_sq
    if max_exp_avg_sq is not None:
        second = torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
    denom = torch.sqrt(second, out=tmp).div_(bc2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=neg_step_size)
