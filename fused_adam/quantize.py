"""8-bit optimizer states (`state_dtype="int8"`): the block format, its reference encode and
decode (torch ops, the oracle of the kernels' bits), and `dequantize_state_dict`.

exp_avg and exp_avg_sq are stored as one uint8 code per element and one fp32 scale per block of
QBLOCK elements, the block's absolute maximum: `state[p]["exp_avg"]` (uint8, p's shape) and
`state[p]["exp_avg_absmax"]` (fp32, ceil(numel / QBLOCK)), the same for exp_avg_sq. A code is a
small float relative to its block's absmax, the fp32 bits `(k + bias) << (23 - mantissa bits)`
(k > 0), 3 mantissa bits, so every value keeps its relative precision (<= 1/16) over a wide
range, not only the largest ones of its block:
  exp_avg     bit 7 the sign, k = bits 0-6: 0, or 1.25 * 2**-16 .. 1.0
  exp_avg_sq  k = all 8 bits: 0, or 1.25 * 2**-32 .. 1.0 (<= 1/32 in the sqrt the update divides
              by, over 16 binades of it); a positive value never encodes as 0 (a zero
              denominator would turn a tiny exp_avg into a step of lr/eps): below the range it
              takes the lowest code
Encoding rounds |x| * (1 / absmax) to nearest even on those bits (integer ops on the fp32 bits:
the same on every backend); decoding is `value(k) * absmax`, exact. A step decodes,
updates in fp32, takes the new absmax of each block and encodes; the param update uses the fp32
moments before encoding. bench/NOTES.md 20 compares this with bitsandbytes' dynamic map.
A non-finite moment makes its block's scale non-finite, so the whole block of 256 elements
(not the one element, as in torch) is NaN from then on: with inf/NaN grads possible, use
skip_nonfinite or a GradScaler, which skip such a step before it reaches the states.
Params under MIN_NUMEL elements keep fp32 states (as bitsandbytes does below 4096): a block's
scale would cost as much as the codes save, and biases and norms are few.
"""
from __future__ import annotations

import torch

QBLOCK = 256
MIN_NUMEL = 4096
CODE_DTYPE = torch.uint8
INT8 = "int8"  # the state_dtype that asks for it
KEYS = ("exp_avg", "exp_avg_sq")  # the states stored so (amsgrad is not supported with them)
MANTISSA = 3  # bits of a code's mantissa
TOP = {"exp_avg": 127, "exp_avg_sq": 255}  # the code of 1.0
BIAS = {key: (127 << MANTISSA) - TOP[key] for key in KEYS}  # 889, 761


def absmax_key(key: str) -> str:
    return key + "_absmax"


ABSMAX_KEYS = tuple(map(absmax_key, KEYS))


def blocks(numel: int) -> int:
    return -(-numel // QBLOCK)


def _blocked(x: torch.Tensor) -> torch.Tensor:
    """x flat, zero-padded to whole blocks, as [blocks, QBLOCK]."""
    x = x.reshape(-1)
    pad = blocks(x.numel()) * QBLOCK - x.numel()
    return torch.nn.functional.pad(x, (0, pad)).view(-1, QBLOCK)


def encode(x: torch.Tensor, absmax: torch.Tensor, key: str) -> torch.Tensor:
    """Codes (uint8, x's numel) of fp32 values x with their blocks' scales `absmax`: the ratio
    |x| * (1 / absmax), 1 / absmax rounded once per block (a multiply per element, not a
    division), to nearest even on three mantissa bits."""
    n = x.numel()
    x = _blocked(x.float())
    inverse = torch.where(absmax > 0, 1 / absmax, 0.0)
    ratio = x.abs() * inverse[:, None]
    bits = ratio.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    drop = 23 - MANTISSA
    rounded = (bits + (1 << (drop - 1)) - 1 + ((bits >> drop) & 1)) >> drop  # to nearest even
    k = rounded - BIAS[key]
    if key == "exp_avg":
        code = k.clamp(0, TOP[key]) | torch.where(x < 0, 0x80, 0)
    else:
        code = torch.where(x > 0, k.clamp(1, TOP[key]), 0)
    return code.reshape(-1)[:n].to(CODE_DTYPE)


def decode(codes: torch.Tensor, absmax: torch.Tensor, key: str) -> torch.Tensor:
    """fp32 values (codes' numel, flat) of codes with their blocks' scales."""
    n = codes.numel()
    c = _blocked(codes.to(torch.int64))
    k = c & 0x7F if key == "exp_avg" else c
    magnitude = torch.where(k == 0, 0, (k + BIAS[key]) << (23 - MANTISSA)).to(
        torch.int32).view(torch.float32)
    value = magnitude * absmax[:, None]
    if key == "exp_avg":
        value = torch.where(c >= 0x80, -value, value)
    return value.reshape(-1)[:n]


def block_absmax(x: torch.Tensor) -> torch.Tensor:
    """Each block's max |x|, fp32: the max of the bits of |x| as integers, which orders
    non-negative floats as floats and puts a NaN above all (the kernels reduce so, in any
    order)."""
    bits = _blocked(x.float()).view(torch.int32) & 0x7FFFFFFF
    return bits.amax(dim=1).view(torch.float32)


def _memory(t: torch.Tensor) -> torch.Tensor:
    """t's elements flat in memory order (t dense, as codes and states are: a channels_last or
    transposed param's codes follow its strides, and the kernels block them in memory order)."""
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size != 1)
    dense, expected = True, 1
    for stride, size in dims:
        dense &= stride == expected
        expected *= size
    if t.is_contiguous() or not dense:  # (not dense: no memory order to follow, logical order)
        return t.reshape(-1)
    return t.as_strided((t.numel(),), (1,), t.storage_offset())


def store(x: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, key: str) -> None:
    """Encode float tensor x (codes' shape) into `codes` and `absmax`, blocks in the codes' memory
    order, with the blocks' new absmax."""
    values = _memory(torch.empty_like(codes, dtype=torch.float32).copy_(x))
    absmax.copy_(block_absmax(values))
    _memory(codes).copy_(encode(values, absmax, key))


def quantize(x: torch.Tensor, key: str, like: torch.Tensor | None = None):
    """(codes, absmax) of float tensor x: codes in x's shape with the strides of `like` (by
    default x's), blocks in their memory order."""
    codes = torch.empty_like(x if like is None else like, dtype=CODE_DTYPE)  # (dense)
    absmax = torch.empty(blocks(x.numel()), device=x.device)
    store(x, codes, absmax, key)
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, key: str) -> torch.Tensor:
    """fp32 values of `codes` (in their shape and strides, blocks in memory order)."""
    out = torch.empty_like(codes, dtype=torch.float32)
    _memory(out).copy_(decode(_memory(codes), absmax.to(codes.device), key))
    return out


def dequantize_state_dict(state_dict: dict) -> dict:
    """An optimizer state_dict with 8-bit states as torch.optim.AdamW's: exp_avg and exp_avg_sq
    fp32 in their params' shapes, the `*_absmax` keys and groups' state_dtype "int8" gone; loads
    into torch.optim.Adam/AdamW or a fused_adam optimizer, which keeps its own state_dtype. The
    input is not modified."""
    state = {}
    for pid, s in state_dict["state"].items():
        s = dict(s)
        for key in KEYS:
            scale = s.pop(absmax_key(key), None)
            if scale is not None:
                s[key] = dequantize(s[key], scale, key)
        state[pid] = s
    # (without the option: a fused_adam optimizer that loads it keeps its own, as it keeps its
    # own options a torch.optim checkpoint lacks; with "int8" a saved option would win)
    groups = [{k: v for k, v in g.items() if k != "state_dtype"} if g.get("state_dtype") == INT8
              else g for g in state_dict["param_groups"]]
    return {**state_dict, "state": state, "param_groups": groups}
