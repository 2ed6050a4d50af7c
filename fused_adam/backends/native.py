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


def adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, *, decay, weight_decay,
               lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
               maximize, decoupled, sr_key, index_base, clip_coef, device_scalars, found_inf):
    torch.ops.fused_adam.adam_step_(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, decay=decay,
        weight_decay=weight_decay,
        lerp_weight=lerp_weight, beta2=beta2, one_minus_beta2=one_minus_beta2,
        neg_step_size=neg_step_size, bc2_sqrt=bc2_sqrt, eps=eps, maximize=maximize,
        decoupled=decoupled, sr_key=sr_key, index_base=index_base, clip_coef=clip_coef,
        device_scalars=device_scalars, found_inf=found_inf)
