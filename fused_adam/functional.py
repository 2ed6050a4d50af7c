"""One Adam/AdamW step over one buffer: host-side scalars, then one backend call."""
from __future__ import annotations

import torch

from . import backends


def adam_step_(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
               exp_avg_sq: torch.Tensor, max_exp_avg_sq: torch.Tensor | None = None,
               master: torch.Tensor | None = None, *,
               step: float, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
               maximize: bool = False, bias_correction: bool = True,
               stochastic_rounding_seed: int | None = None, index_base: int = 0,
               clip_coef: torch.Tensor | None = None, found_inf: torch.Tensor | None = None,
               backend: str = "auto") -> None:
    """Update `param`, `exp_avg`, `exp_avg_sq` (and `max_exp_avg_sq`, i.e. amsgrad) in place.

    With `master` (an fp32 copy of a bf16/fp16 param) the math updates the master and the param
    is written as its rounding. Math is fp32 whatever the tensors' dtypes; each result is rounded
    once on store: to nearest even, or for a bf16 param with `stochastic_rounding_seed` set,
    stochastically with random bits keyed on (seed, step, index_base + element index), the same
    on every backend. `clip_coef`, a one-element fp32 tensor on the param's device (computed
    there, e.g. from the grads' norm), multiplies the grads first, read by the kernel: no sync.
    `step` may be a 0-dim tensor (the step count on the device): bias corrections and step size
    are then computed on the device (with `lr` a float or a device tensor), and with `found_inf`
    (nonzero: skip) nothing is written.

    `step` is the step count including this one (1 on the first step). The scalars are computed
    once here in double precision, as `_single_tensor_adam` computes them in Python; kernels
    receive them rounded to fp32, as ATen's ops do.
    """
    beta1, beta2, weight_decay = float(beta1), float(beta2), float(weight_decay)
    device_scalars = None
    if torch.is_tensor(step):  # a tensor lr stays a tensor: read on the device
        if stochastic_rounding_seed is not None:
            raise ValueError("stochastic rounding needs the step count on the host")
        if torch.is_tensor(lr):
            lr = lr.to(param.device, torch.float64)
        device_scalars = _device_scalars(step.to(param.device, torch.float64), lr, beta1, beta2,
                                         weight_decay, bias_correction)
        decay = neg_step_size = bc2_sqrt = 0.0  # read from device_scalars
    else:
        lr = float(lr)
        bc1 = 1 - beta1**step if bias_correction else 1.0
        bc2 = 1 - beta2**step if bias_correction else 1.0
        decay, neg_step_size, bc2_sqrt = 1 - lr * weight_decay, -(lr / bc1), bc2**0.5
    backends.resolve(backend, param.device, param.dtype)(
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master,
        decay=decay, weight_decay=weight_decay, lerp_weight=1 - beta1,
        beta2=beta2, one_minus_beta2=1 - beta2, neg_step_size=neg_step_size,
        bc2_sqrt=bc2_sqrt, eps=float(eps), maximize=bool(maximize),
        decoupled=bool(decoupled_weight_decay),
        sr_key=None if stochastic_rounding_seed is None else sr_key(stochastic_rounding_seed, step),
        index_base=int(index_base), clip_coef=clip_coef, device_scalars=device_scalars,
        found_inf=found_inf)


def _device_scalars(step, lr, beta1, beta2, weight_decay, bias_correction) -> torch.Tensor:
    """[decay, neg_step_size, bc2_sqrt] as fp32 on the step's device, computed there in double
    with the same operations as the host path (pow, division, sqrt): no host sync."""
    one = torch.ones_like(step)
    bc1 = 1 - torch.pow(beta1, step) if bias_correction else one
    bc2 = 1 - torch.pow(beta2, step) if bias_correction else one
    return torch.stack([one * (1 - lr * weight_decay), -(lr / bc1), bc2.sqrt()]).float()


def lowbias32(x: int) -> int:
    """The 32-bit hash of csrc/adam_math.h, on Python ints."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def sr_key(seed: int, step: float) -> int:
    """The per-launch key of stochastic rounding: a hash of (seed, step)."""
    return lowbias32((int(seed) & 0xFFFFFFFF) ^ lowbias32(int(step) & 0xFFFFFFFF))
