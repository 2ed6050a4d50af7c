"""Backend registry: every backend module exposes the same two functions.

    unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None
    adam_step_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, masters, exp_avg_absmaxes,
               exp_avg_sq_absmaxes, hyper, segments, *, stochastic, found_inf) -> None  # in place

One call is one launch over segments of buffers (fused_adam/functional.py: SEGMENT_FIELDS,
HYPER_FIELDS): buffer b's operands are params[b], grads[b], exp_avgs[b], exp_avg_sqs[b], and
max_exp_avg_sqs[b] (amsgrad) and masters[b] (master weights) where those lists are not empty.
Each tensor may be float32, bfloat16 or float16 independently (a master is the fp32 copy of a
low-precision param: the math updates it and the param gets its rounding). With 8-bit states
(exp_avg_absmaxes and exp_avg_sq_absmaxes not empty, fused_adam/quantize.py) exp_avgs and
exp_avg_sqs hold uint8 codes, the absmaxes one fp32 scale per block, segments start on a block. `hyper` is the
float64 hyperparameter table (on the CPU, or on the buffers' device when computed there);
`segments` a flat list of ints, five per segment. `stochastic` rounds bf16 params stochastically
with the random bits of element i of a segment keyed on (its row's sr_key, index_base + i) as
csrc/adam_math.h defines. `found_inf` (a device scalar, or None) skips the whole update when
nonzero, read by the kernel: no host sync.

Names: "torch" (reference, any device), "triton" (CUDA; CPU under TRITON_INTERPRET=1), "cpu" and
"cuda" (the compiled extension in csrc/, see fused_adam._ext).

`auto` picks the fastest available backend for a device and falls back silently; an explicit
name that cannot run raises with the stored reason (the import error or the device mismatch).
"""
from __future__ import annotations

import importlib
import os

import torch

_MODULES = {
    "torch": "fused_adam.backends.torch_ref",
    "triton": "fused_adam.backends.triton_kernel",
    "cpu": "fused_adam.backends.native",
    "cuda": "fused_adam.backends.native",
}
# The dtypes the kernels (triton, cpu, cuda) step: they compute in fp32, so float64 goes to torch.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The extension's backends are named for the one device type each runs on.
_DEVICE_TYPE = {"cpu": "cpu", "cuda": "cuda"}
# Preference order for `auto`, per device type; "torch" runs everywhere. On CUDA the extension
# first: same kernel time as Triton (GPT-2 on an H100: 1.16 ms each), but Triton's Python launcher
# adds ~55 us of host time per launch (single tensor: 158 vs 103 us per step; GPT-2 step 1.56 vs
# 2.00 ms, bench/NOTES.md 23).
_AUTO = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}
_loaded: dict[str, object] = {}
_resolved: dict[tuple, object] = {}

NAMES = ("auto", *_MODULES)
OVERRIDE = "FUSED_ADAM_BACKEND"  # the environment variable that overrides `auto`


def _module(name: str):
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(_MODULES[name])
        except Exception as exc:  # noqa: BLE001 - any import failure makes the backend unavailable
            _loaded[name] = exc
    return _loaded[name]


def check_name(name: str) -> None:
    if name not in NAMES:
        raise ValueError(f"Invalid backend: {name!r}; expected one of {', '.join(NAMES)}")


def unavailable_reason(name: str, device: torch.device,
                       dtype: torch.dtype = torch.float32) -> str | None:
    """None when `name` can step `dtype` buffers on `device`, else why not."""
    if _DEVICE_TYPE.get(name, device.type) != device.type:
        return f"backend {name!r} steps {_DEVICE_TYPE[name]} tensors only"
    if device.type == "cuda" and not torch.cuda.is_available():  # before a JIT build is tried
        return "CUDA is not available"
    mod = _module(name)
    if isinstance(mod, Exception):
        return f"import failed: {type(mod).__name__}: {mod}"
    return mod.unavailable_reason(device, dtype)


def available(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> list[str]:
    """The explicit backend names that can step `dtype` params on `device`."""
    device = torch.device(device)
    return [n for n in _MODULES if unavailable_reason(n, device, dtype) is None]


def resolve(name: str, device: torch.device, dtype: torch.dtype):
    """The step function of backend `name` for `dtype` buffers on `device`; `auto` honours
    FUSED_ADAM_BACKEND."""
    # (the environment is read for `auto` only: ~1 us a call, once per buffer and step)
    key = (name, device, dtype, os.environ.get(OVERRIDE) if name == "auto" else None)
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(name, device, dtype)
    return fn


def _resolve(name: str, device: torch.device, dtype: torch.dtype):
    if name == "auto":
        name = os.environ.get(OVERRIDE, "auto")
        check_name(name)
    if name == "auto":
        for candidate in _AUTO.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device, dtype) is None:
                return _module(candidate).adam_step_
    reason = unavailable_reason(name, device, dtype)
    if reason is not None:
        raise RuntimeError(f"fused_adam backend {name!r} is unavailable for {dtype} on {device}: "
                           f"{reason}")
    return _module(name).adam_step_
