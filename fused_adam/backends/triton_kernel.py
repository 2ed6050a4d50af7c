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

from .. import quantize
from ..functional import SEGMENT_FIELDS
from . import KERNEL_DTYPES

# 1024 elements per program at 4 warps = 8 fp32 per thread = two 128-bit loads per tensor per
# thread; a 16M-element buffer is 16K programs, ~120 waves on 132 SMs, so no tail effect.
BLOCK = 1024
NUM_WARPS = 4


@triton.jit
def _adam_math(p, g, m, v, vmax, grad_mult, decay, weight_decay, lerp_weight, beta2,
               one_minus_beta2, neg_step_size, bc2_sqrt, eps, AMSGRAD: tl.constexpr):
    """fp32 in, fp32 out; the op order of torch.optim's `_single_tensor_adam`. Weight decay that
    does not apply has neutral fields (csrc/adam_math.h): selected, as torch's branches."""
    g = g * grad_mult
    g = tl.where(weight_decay != 0, tl.fma(p, weight_decay, g), g)
    p = tl.where(decay != 1, p * decay, p)
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
def _step_values(offs, mask, p_ptr, g_ptr, m, v, vmax, w_ptr, hyper_ptr, row, index_base,
                 AMSGRAD: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Step the elements `offs` (where `mask`) with row `row` of the table, their moments given
    in fp32: loads the param (or master) and grad, stores them; returns (p, m, v, vmax)."""
    # The row (fused_adam/functional.py HYPER_FIELDS), double, rounded to fp32 as ATen rounds.
    h = hyper_ptr + row.to(tl.int64) * 10
    grad_mult = tl.load(h).to(tl.float32)
    decay = tl.load(h + 1).to(tl.float32)
    weight_decay = tl.load(h + 2).to(tl.float32)
    lerp_weight = tl.load(h + 3).to(tl.float32)
    beta2 = tl.load(h + 4).to(tl.float32)
    one_minus_beta2 = tl.load(h + 5).to(tl.float32)
    neg_step_size = tl.load(h + 6).to(tl.float32)
    bc2_sqrt = tl.load(h + 7).to(tl.float32)
    eps = tl.load(h + 8).to(tl.float32)
    # With a master copy (w, fp32) the math updates the master; the param is its rounded image,
    # unless user code wrote the param since: that write wins (csrc/adam_math.h).
    if MASTER:
        p = tl.load(w_ptr + offs, mask=mask)
        written = tl.load(p_ptr + offs, mask=mask)
        p = tl.where(p.to(written.dtype) == written, p, written.to(tl.float32))
    else:
        p = tl.load(p_ptr + offs, mask=mask).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask).to(tl.float32)
    p, m, v, vmax = _adam_math(p, g, m, v, vmax, grad_mult, decay, weight_decay, lerp_weight,
                               beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps, AMSGRAD)
    if MASTER:
        tl.store(w_ptr + offs, p, mask=mask)
    if STOCHASTIC:
        key = tl.load(h + 9).to(tl.int64).to(tl.uint32)
        bits = _bf16_stochastic(p, key, index_base + offs)
        tl.store(p_ptr.to(tl.pointer_type(tl.uint16)) + offs, bits, mask=mask)
    else:
        tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)
    return p, m, v, vmax


@triton.jit
def _step_elements(offs, mask, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, hyper_ptr, row,
                   index_base, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                   STOCHASTIC: tl.constexpr):
    """Load, step and store the elements `offs` where `mask`, with row `row` of the table."""
    m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
    v = tl.load(v_ptr + offs, mask=mask).to(tl.float32)
    vmax = v
    if AMSGRAD:
        vmax = tl.load(vmax_ptr + offs, mask=mask).to(tl.float32)
    p, m, v, vmax = _step_values(offs, mask, p_ptr, g_ptr, m, v, vmax, w_ptr, hyper_ptr, row,
                                 index_base, AMSGRAD, MASTER, STOCHASTIC)
    tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    if AMSGRAD:
        tl.store(vmax_ptr + offs, vmax.to(vmax_ptr.dtype.element_ty), mask=mask)


# 8-bit states (fused_adam/quantize.py): code k > 0 is the fp32 bits (k + bias) << DROP times its
# block's absmax; the top code is 1.0.
_M_BIAS = tl.constexpr(quantize.BIAS["exp_avg"])
_V_BIAS = tl.constexpr(quantize.BIAS["exp_avg_sq"])
_DROP = tl.constexpr(23 - quantize.MANTISSA)  # fp32 mantissa bits not kept
_HALF = tl.constexpr(1 << (22 - quantize.MANTISSA))  # half of the last kept bit
_M_TOP = tl.constexpr(quantize.TOP["exp_avg"])
_V_TOP = tl.constexpr(quantize.TOP["exp_avg_sq"])
_QBLOCK = tl.constexpr(quantize.QBLOCK)


@triton.jit
def _q8_decode(code, absmax, BIAS: tl.constexpr, SIGNED: tl.constexpr):
    """fp32 values of 8-bit state codes with their blocks' scales: csrc/adam_math.h q8_decode."""
    c = code.to(tl.int32)
    k = c & 0x7F if SIGNED else c
    value = tl.where(k == 0, 0, (k + BIAS) << _DROP).to(tl.float32, bitcast=True) * absmax
    if SIGNED:
        value = tl.where(c >= 0x80, -value, value)
    return value


@triton.jit
def _q8_encode(x, inverse, BIAS: tl.constexpr, TOP: tl.constexpr, SIGNED: tl.constexpr):
    """Codes of fp32 x with 1 / their blocks' new scales: csrc/adam_math.h q8_encode."""
    bits = (tl.abs(x) * inverse).to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    k = ((bits + (_HALF - 1) + ((bits >> _DROP) & 1)) >> _DROP).to(tl.int32) - BIAS
    k = tl.minimum(k, TOP)
    if SIGNED:
        code = tl.maximum(k, 0) | tl.where(x < 0, 0x80, 0)
    else:
        code = tl.where(x > 0, tl.maximum(k, 1), 0)
    return code.to(tl.uint8)


@triton.jit
def _block_absmax(x, BLOCK: tl.constexpr, QBLOCK: tl.constexpr):
    """Each QBLOCK run's max |x| as integers on the bits (a NaN wins): csrc/adam_math.h."""
    bits = tl.reshape(x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, (BLOCK // QBLOCK, QBLOCK))
    return tl.max(bits, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _step_q8(block, n, p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, ma_ptr, va_ptr, hyper_ptr, row,
             index_base, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr,
             QBLOCK: tl.constexpr):
    """Program `block` of a segment of n elements with 8-bit states: decode, step, store the
    param, then encode the moments with their blocks' new absmax (whole blocks per program)."""
    offs = block * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    blocks = block * (BLOCK // QBLOCK) + tl.arange(0, BLOCK // QBLOCK)
    in_use = blocks * QBLOCK < n
    m_scale = tl.reshape(tl.broadcast_to(tl.load(ma_ptr + blocks, mask=in_use)[:, None],
                                         (BLOCK // QBLOCK, QBLOCK)), (BLOCK,))
    v_scale = tl.reshape(tl.broadcast_to(tl.load(va_ptr + blocks, mask=in_use)[:, None],
                                         (BLOCK // QBLOCK, QBLOCK)), (BLOCK,))
    m = _q8_decode(tl.load(m_ptr + offs, mask=mask), m_scale, _M_BIAS, True)
    v = _q8_decode(tl.load(v_ptr + offs, mask=mask), v_scale, _V_BIAS, False)
    p, m, v, _ = _step_values(offs, mask, p_ptr, g_ptr, m, v, v, w_ptr, hyper_ptr, row,
                              index_base, False, MASTER, STOCHASTIC)
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    m_top = _block_absmax(m, BLOCK, QBLOCK)
    v_top = _block_absmax(v, BLOCK, QBLOCK)
    m_inverse = tl.where(m_top > 0, tl.div_rn(tl.full(m_top.shape, 1.0, tl.float32), m_top), 0.0)
    v_inverse = tl.where(v_top > 0, tl.div_rn(tl.full(v_top.shape, 1.0, tl.float32), v_top), 0.0)
    m_inverse = tl.reshape(tl.broadcast_to(m_inverse[:, None], (BLOCK // QBLOCK, QBLOCK)), (BLOCK,))
    v_inverse = tl.reshape(tl.broadcast_to(v_inverse[:, None], (BLOCK // QBLOCK, QBLOCK)), (BLOCK,))
    tl.store(m_ptr + offs, _q8_encode(m, m_inverse, _M_BIAS, _M_TOP, True),
             mask=mask)
    tl.store(v_ptr + offs, _q8_encode(v, v_inverse, _V_BIAS, _V_TOP, False),
             mask=mask)
    tl.store(ma_ptr + blocks, m_top, mask=in_use)
    tl.store(va_ptr + blocks, v_top, mask=in_use)


# The launcher's segment table, int64, one row per segment: each operand's offset from its base
# argument in elements (p, g, m, v, vmax, w, m's absmax, v's absmax), then length, row,
# index_base and first program.
_COLUMNS = tl.constexpr(12)


@triton.jit(do_not_specialize=["n_segments"])
def _adam_kernel(p_base, g_base, m_base, v_base, vmax_base, w_base, ma_base, va_base, table_ptr,
                 n_segments, hyper_ptr, found_ptr, AMSGRAD: tl.constexpr, MASTER: tl.constexpr,
                 STOCHASTIC: tl.constexpr, SKIP: tl.constexpr, ALIGNED: tl.constexpr,
                 Q8: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)  # int64 offsets: flat buffers pass 2**31 elements
    # This program's segment: the last one whose first program is <= pid (binary search).
    lo = pid * 0
    hi = lo + n_segments
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ahead = tl.load(table_ptr + mid * _COLUMNS + 11) <= pid
        lo = tl.where(ahead, mid, lo)
        hi = tl.where(ahead, hi, mid)
    seg = table_ptr + lo * _COLUMNS
    length = tl.load(seg + 8)
    row = tl.load(seg + 9)
    index_base = tl.load(seg + 10)
    block = pid - tl.load(seg + 11)
    p_ptr = p_base + tl.load(seg)
    g_ptr = g_base + tl.load(seg + 1)
    m_ptr = m_base + tl.load(seg + 2)
    v_ptr = v_base + tl.load(seg + 3)
    vmax_ptr = vmax_base + tl.load(seg + 4)
    w_ptr = w_base + tl.load(seg + 5)
    if ALIGNED:  # every operand of every segment starts 16-byte aligned (the launcher checked)
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
        vmax_ptr = tl.multiple_of(vmax_ptr, 16)
        w_ptr = tl.multiple_of(w_ptr, 16)
    n_elements = length
    if SKIP:  # found_inf, decided on the device: every load and store masked off
        n_elements = tl.where(tl.load(found_ptr) == 0, length, 0)
    if Q8:  # whole blocks of scales per program, one call (ALIGNED: lengths of 16k too)
        if ALIGNED:
            n_elements = tl.multiple_of(n_elements, 16)
        _step_q8(block, n_elements, p_ptr, g_ptr, m_ptr, v_ptr, w_ptr,
                 ma_base + tl.load(seg + 6), va_base + tl.load(seg + 7), hyper_ptr, row,
                 index_base, MASTER, STOCHASTIC, BLOCK, _QBLOCK)
    else:
        # 128-bit accesses need a mask that is constant over runs of 16 elements: the body, n
        # rounded down to a multiple of 16, has one; the ragged tail (< 16 elements, e.g. a
        # functional call on a 4099-element tensor) is stepped by the segment's last program,
        # element by element. Without the split such a length makes every access scalar.
        body = tl.multiple_of(n_elements // 16 * 16, 16)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        _step_elements(offs, offs < body, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr, hyper_ptr,
                       row, index_base, AMSGRAD, MASTER, STOCHASTIC)
        if block == (length + BLOCK - 1) // BLOCK - 1:
            tail = body + tl.arange(0, 16)
            _step_elements(tail, tail < n_elements, p_ptr, g_ptr, m_ptr, v_ptr, vmax_ptr, w_ptr,
                           hyper_ptr, row, index_base, AMSGRAD, MASTER, STOCHASTIC)


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


def adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
               exp_avg_sq_absmaxes, hyper, segments, *, stochastic, found_inf):
    """The registry's interface (fused_adam/backends/__init__.py): one launch per set of operand
    dtypes (the kernel's pointer types), over a segment table; under torch.compile one per buffer
    (the table then holds offsets into that buffer only: no data_ptr, which dynamo cannot trace)."""
    if not params:
        return
    if stochastic and (params[0].dtype != torch.bfloat16 or masters):
        raise ValueError("stochastic rounding applies to bfloat16 params without a master copy")
    lists = (params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
             exp_avg_sq_absmaxes)
    for lst in lists[:6]:
        if not all(t.is_contiguous() and t.numel() == p.numel() for t, p in zip(lst, params)):
            raise ValueError("the triton backend steps contiguous buffers of equal size")
    device = params[0].device
    # Host rows: one copy per launch, queued: a blocking copy from pageable memory waits for the
    # stream, and so did every step (H100, 2026-11-28: one sync per step, 181 vs 112 us host time)
    hyper = hyper.to(device, non_blocking=True)
    compiling = torch.compiler.is_compiling()
    width = len(SEGMENT_FIELDS)
    launches: dict[object, list] = {}
    for k in range(0, len(segments), width):
        segment = segments[k:k + width]
        if segment[2]:
            buffer = segment[0]
            key = buffer if compiling else tuple(str(lst[buffer].dtype) for lst in lists if lst)
            launches.setdefault(key, []).append(segment)
    # Triton launches on the current device; torch's fused ops follow the tensors' device.
    guard = (torch.cuda.device(device) if device.type == "cuda" and device.index !=
             torch.cuda.current_device() else contextlib.nullcontext())
    with guard:
        for launch in launches.values():
            _launch(lists, launch, hyper, stochastic, found_inf, compiling)


def _launch(lists, segments, hyper, stochastic, found_inf, compiling):
    """One kernel over `segments`: operands addressed from the first segment's buffer (every
    allocation is in one address space, so another buffer is an offset from it)."""
    first = segments[0][0]
    bases = [lst[first] if lst else None for lst in lists]
    rows, programs, aligned = [], 0, not compiling
    q8 = bases[6] is not None
    for buffer, start, length, row, index_base in segments:
        offsets = []
        for k, (lst, base) in enumerate(zip(lists, bases)):
            if base is None:
                offsets.append(0)
                continue
            t = lst[buffer]
            at = start // quantize.QBLOCK if k >= 6 else start  # (scales: one per block)
            offset = at if buffer == first else (
                at + (t.data_ptr() - base.data_ptr()) // t.element_size())
            offsets.append(offset)
            if aligned and k < 6:
                aligned = (base.data_ptr() + offset * t.element_size()) % 16 == 0
        aligned &= not q8 or length % 16 == 0
        rows.append((*offsets, length, row, index_base, programs))
        programs += triton.cdiv(length, BLOCK)
    table = _table(rows, hyper.device, compiling)
    p = bases[0]
    _adam_kernel[(programs,)](
        *(p if base is None else base for base in bases), table, len(rows), hyper,
        p if found_inf is None else found_inf, AMSGRAD=bases[4] is not None,
        MASTER=bases[5] is not None, STOCHASTIC=stochastic, SKIP=found_inf is not None,
        ALIGNED=aligned, Q8=q8, BLOCK=BLOCK, num_warps=NUM_WARPS, enable_fp_fusion=False)


_TABLES: dict[tuple, torch.Tensor] = {}


def _table(rows, device, compiling) -> torch.Tensor:
    """The segment table on the device, made once per layout: a step whose table is the last
    one's copies nothing (a CUDA graph captures the kernel reading the kept table)."""
    if compiling or device.type == "cpu":
        return torch.tensor(rows, dtype=torch.int64, device=device)
    key = (str(device), *rows)
    table = _TABLES.get(key)
    if table is None:
        if len(_TABLES) >= 64:  # layouts come and go (re-packs, functional calls): bounded
            _TABLES.pop(next(iter(_TABLES)))
        table = _TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device)
    return table
