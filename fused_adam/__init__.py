"""Fused Adam/AdamW for PyTorch: one memory-bound pass per flat buffer per step."""
from .backends import available as available_backends
from .functional import adam_step_
from .optimizer import FusedAdam, FusedAdamW

__all__ = ["FusedAdam", "FusedAdamW", "adam_step_", "available_backends"]
__version__ = "0.1.0"
