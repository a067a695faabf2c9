"""Triton kernels of st-adapter-fast, installed as ``st_adapter_fast.kernels``.

adapter_fwd: fused down-projection + temporal conv, fused up-projection + residual (2 launches).
adapter_bwd: recompute backward (recompute, conv transpose + conv grads, dgrad; 5 launches).
wgrad: both weight GEMMs in one launch, and the fixed-order reduce-and-cast of every partial.
tuning: tile configs (defaults, sweep candidates, tuned table); aot: AOT compile checks;
work_model: every launch's FLOPs, bytes, registers and waves without a GPU (docs/design.md §10).
"""

from .adapter_bwd import adapter_backward
from .adapter_fwd import adapter_forward

__all__ = ["adapter_forward", "adapter_backward"]
