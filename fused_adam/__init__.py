"""Fused Adam/AdamW for PyTorch: one memory-bound pass per flat buffer per step."""
from .backends import available as available_backends
from .functional import adam_step_
from .optimizer import FusedAdam, FusedAdamW
from .quantize import dequantize_state_dict

__all__ = ["FusedAdam", "FusedAdamW", "adam_step_", "available_backends", "dequantize_state_dict"]
__version__ = "0.1.0"
