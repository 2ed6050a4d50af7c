"""Triton backend: the whole Adam/AdamW step in one pass over a flat buffer.

Bytes per fp32 element: read p, g, m, v and write p, m, v = 28 B (amsgrad: +8). The kernel does
~20 flops per element, far below the ~70 flop/B an H100 can afford, so it is purely memory-bound:
the launcher only has to keep loads 128 bits wide and the grid large.

Rounding follows torch's CPU ATen kernels op for op (measured on torch 2.13, AVX-512): lerp,
`add(alpha=)` and `addcmul` round through one FMA each; every other op rounds on its own. The
launch passes enable_fp_fusion=False so the compiler adds no FMA torch does not have, and the
math uses explicit tl.fma where torch has one: the same bits on a GPU and under the interpreter.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from . import KERNEL_DTYPES

# 1024 elements per program at 4 warps = 8 fp32 per thread = two 128-bit loads per tensor per
# thread; a 16M-element buffer is 16K programs, ~120 waves on 132 SMs, so no tail effect.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _adam_math(p, g, m, v, vmax, decay, weight_decay, lerp_weight, beta2, one_minus_beta2,
               neg_step_size, bc2_sqrt, eps, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
               DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr):
    """fp32 in, fp32 out; the op order of torch.optim's `_single_tensor_adam`."""
    if MAXIMIZE:
        g = -g
    if WEIGHT_DECAY:
        if DECOUPLED:
            p = p * decay
        else:
            g = tl.fma(p, weight_decay, g)
    # torch's lerp: start + w*(end-start) for |w| < 0.5, else end + (w-1)*(end-start), one FMA.
    small = lerp_weight < 0.5
    m = tl.fma(tl.where(small, lerp_weight, lerp_weight - 1.0), g - m, tl.where(small, m, g))
    v = tl.fma(one_minus_beta2 * g, g, v * beta2)
    if AMSGRAD:
        vmax = tl.maximum(vmax, v, propagate_nan=tl.PropagateNan.ALL)
        denom = tl.div_rn(tl.sqrt_rn(vmax), bc2_sqrt) + eps
    else:
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)
    return p, m, v, vmax


@triton.jit
def _lowbias32(x):
    """csrc/adam_math.h's hash, on uint32."""
    x ^= x >> 16
    x *= tl.full((), 0x7FEB352D, tl.uint32)
    x ^= x >> 15
    x *= tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _bf16_stochastic(p, key, index):
    """bf16 bits (uint16) of fp32 p, stochastically rounded: csrc/adam_math.h."""
    index = index.to(tl.int64)  # an i32 index (i32 index_base and tail) would make >> 32 undefined
    lo = index.to(tl.uint32)
    hi = (index >> 32).to(tl.uint32) * tl.full((), 0x9E3779B9, tl.uint32)
    random = _lowbias32(key ^ _lowbias32(lo ^ hi))
    bits = p.to(tl.uint32, bitcast=True)
    special = (bits & 0x7F800000) == 0x7F800000
    kept = (bits >> 16) | tl.where((bits & 0xFFFF) != 0, 0x40, 0).to(tl.uint32)
    return tl.where(special, kept, (bits + (random & 0xFFFF)) >> 16).to(tl.uint16)


@triton.jit
def _step_elements(offs, mask, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, decay, weight_decay,
                   lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, sr_key,
                   index_base, clip_ptr, MAXIMIZE: tl.constexpr, WEIGHT_DECAY: tl.constexpr,
                   DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                   STOCHASTIC: tl.constexpr, CLIP: tl.constexpr):
    """Load, step and store the elements `offs` where `mask`."""
    # With a master copy (w, fp32) the math updates the master; the param is its rounded image,
    # unless user code wrote the param since: that write wins (csrc/adam_math.h).
    if MASTER:
        p = tl.load(w_ptr + offs, mask=mask)
        written = tl.load(p_ptr + offs, mask=mask)
        p = tl.where(p.to(written.dtype) == written, p, written.to(tl.float32))
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    if CLIP:  # the clip coefficient, computed on the device: no host sync
        g = g * tl.load(clip_ptr)
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
    p, m, v, vmax = _adam_math(p, g, m, v, vmax, decay, weight_decay, lerp_weight, beta2,
                               one_minus_beta2, neg_step_size, bc2_sqrt, eps, MAXIMIZE,
                               WEIGHT_DECAY, DECOUPLED, AMSGRAD)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    if STOCHASTIC:
        bits = _bf16_stochastic(p, sr_key.to(tl.uint32), index_base + offs)
        tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + offs, bits, mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=mask)


# sr_key changes every step and index_base every segment: specialized (== 1, % 16) they would
# compile new variants mid-run (sr_key == 1 even fails to compile: `'int' object has no attribute
# 'to'`). n_elements is not specialized either: the kernel finds its aligned body itself.
@triton.jit(do_not_specialize=["n_elements", "sr_key", "index_base"])
def _adam_kernel(p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, n_elements, decay, weight_decay,
                 lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, sr_key,
                 index_base, clip_ptr, scalars_ptr, found_ptr, MAXIMIZE: tl.constexpr,
                 WEIGHT_DECAY: tl.constexpr, DECOUPLED: tl.constexpr, AMSGRAD: tl.constexpr,
                 MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, CLIP: tl.constexpr,
                 DEVICE_SCALARS: tl.constexpr, SKIP: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: flat buffers pass 2**31 elements
    if SKIP:  # found_inf, decided on the device: every load and store masked off
        n_elements = tl.where(tl.load(found_ptr) == 0, n_elements, 0)
    if DEVICE_SCALARS:  # computed on the device from the device step count
        decay = tl.load(scalars_ptr)
        neg_step_size = tl.load(scalars_ptr + 1)
        bc2_sqrt = tl.load(scalars_ptr + 2)
    # 128-bit accesses need a mask that is constant over runs of 16 elements: the body, n rounded
    # down to a multiple of 16, has one; the ragged tail (< 16 elements, e.g. a functional call
    # on a 4099-element tensor) is stepped by the last program, element by element. Without the
    # split such a length makes every access of the launch scalar.
    body = tl.multiple_of(n_elements // 16 * 16, 16)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    _step_elements(offs, offs < body, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, decay,
                   weight_decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt,
                   eps, sr_key, index_base, clip_ptr, MAXIMIZE, WEIGHT_DECAY, DECOUPLED, AMSGRAD,
                   MASTER, STOCHASTIC, CLIP)
    if pid == tl.num_programs(0) - 1:
        tail = body.to(tl.int64) + tl.arange(0, 16)  # int64, as the body's offsets
        _step_elements(tail, tail < n_elements, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
                       decay, weight_decay, lerp_weight, beta2, one_minus_beta2, neg_step_size,
                       bc2_sqrt, eps, sr_key, index_base, clip_ptr, MAXIMIZE, WEIGHT_DECAY,
                       DECOUPLED, AMSGRAD, MASTER, STOCHASTIC, CLIP)


def _as_int32(key: int) -> int:
    """A uint32 key as the int32 of the same bits. Triton types an int argument i32 or i64 by its
    value even where it does not specialize it: a uint32 passed as is would switch variants
    between steps (keys >= 2**31); the kernel's `.to(tl.uint32)` restores the bits."""
    return key - (1 << 32) if key >= 1 << 31 else key


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    if dtype not in KERNEL_DTYPES:
        return f"the kernel computes in fp32 and steps {', '.join(map(str, KERNEL_DTYPES))} only"
    if device.type == "cuda":
        if os.environ.get("TRITON_INTERPRET") == "1":  # the interpreter runs programs in numpy
            return "under TRITON_INTERPRET=1 Triton steps CPU tensors only"
        return None
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return None
        return "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton does not run on {device.type} tensors"


def adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, *, sr_key, **scalars):
    """The registry's interface (fused_adam/backends/__init__.py)."""
    if sr_key is not None and (param.dtype != torch.bfloat16 or master is not None):
        raise ValueError("stochastic rounding applies to bfloat16 params without a master copy")
    tensors = tuple(t for t in (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master)
                    if t is not None)
    if not all(t.is_contiguous() and t.numel() == param.numel() for t in tensors):
        raise ValueError("the triton backend steps contiguous buffers of equal size")
    n = param.numel()
    if n == 0:
        return
    amsgrad = max_exp_avg_sq is not None
    # Triton launches on the current device; torch's fused ops follow the tensors' device.
    guard = (torch.cuda.device(param.device) if param.is_cuda and param.device.index !=
             torch.cuda.current_device() else contextlib.nullcontext())
    with guard:
        _launch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, n, amsgrad, sr_key=sr_key,
                **scalars)


def _launch(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, n, amsgrad, *, decay,
            weight_decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
            maximize, decoupled, sr_key, index_base, clip_coef, device_scalars, found_inf):
    _adam_kernel[(triton.cdiv(n, BLOCK),)](
        param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq if amsgrad else exp_avg_sq,
        param if master is None else master, n,
        decay, weight_decay, lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
        _as_int32(sr_key or 0), index_base, param if clip_coef is None else clip_coef,
        param if device_scalars is None else device_scalars,
        param if found_inf is None else found_inf,
        MAXIMIZE=maximize, WEIGHT_DECAY=weight_decay != 0, DECOUPLED=decoupled, AMSGRAD=amsgrad,
        MASTER=master is not None, STOCHASTIC=sr_key is not None, CLIP=clip_coef is not None,
        DEVICE_SCALARS=device_scalars is not None, SKIP=found_inf is not None, BLOCK=BLOCK,
        num_warps=NUM_WARPS, enable_fp_fusion=False)
