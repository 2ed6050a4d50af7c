"""Backend registry: every backend module exposes the same two functions.

    unavailable_reason(device: torch.device) -> str | None
    adam_step_(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, decay, weight_decay,
               lerp_weight, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
               maximize, decoupled) -> None      # in place, one flat buffer

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
}
# Preference order for `auto`, per device type; "torch" runs everywhere.
_AUTO = {"cuda": ("triton", "torch")}
_loaded: dict[str, object] = {}
_resolved: dict[tuple, object] = {}

NAMES = ("auto", *_MODULES)


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


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None when `name` can step tensors on `device`, else why not."""
    mod = _module(name)
    if isinstance(mod, Exception):
        return f"import failed: {type(mod).__name__}: {mod}"
    return mod.unavailable_reason(device)


def available(device: torch.device | str = "cpu") -> list[str]:
    """The explicit backend names that can run on `device`."""
    device = torch.device(device)
    return [n for n in _MODULES if unavailable_reason(n, device) is None]


def resolve(name: str, device: torch.device):
    """The step function of backend `name` for `device`; `auto` honours FUSED_ADAM_BACKEND."""
    key = (name, device, os.environ.get("FUSED_ADAM_BACKEND"))
    fn = _resolved.get(key)
    if fn is None:
        fn = _resolved[key] = _resolve(name, device)
    return fn


def _resolve(name: str, device: torch.device):
    if name == "auto":
        name = os.environ.get("FUSED_ADAM_BACKEND", "auto")
        check_name(name)
    if name == "auto":
        for candidate in _AUTO.get(device.type, ("torch",)):
            if unavailable_reason(candidate, device) is None:
                return _module(candidate).adam_step_
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(f"fused_adam backend {name!r} is unavailable on {device}: {reason}")
    return _module(name).adam_step_
