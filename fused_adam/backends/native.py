"""Backends "cpu" and "cuda": the compiled extension (csrc/) through `torch.ops.fused_adam`."""
from __future__ import annotations

import torch

from .. import _ext
from . import KERNEL_DTYPES


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the kernels compute in fp32 and step {', '.join(map(str, KERNEL_DTYPES))} only"
    reason = _ext.load()
    if reason is not None:
        return f"the extension is not available: {reason}"
    if device.type not in ("cpu", "cuda") or not _ext.has_kernel(device.type):
        return f"the extension was built without a {device.type} kernel"
    return None


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
               exp_avg_sq_absmaxes, hyper, segments, *, stochastic, found_inf):
    torch.ops.fused_adam.adam_step_.default(  # (the overload: no OpOverloadPacket dispatch)
        params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
        exp_avg_sq_absmaxes, hyper, segments, stochastic=stochastic, found_inf=found_inf)
