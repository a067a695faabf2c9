"""Triton kernels of st-adapter-fast, installed as ``st_adapter_fast.kernels``.

adapter_fwd: fused down-projection + temporal conv, fused up-projection + residual.
adapter_bwd: recompute backward (conv transpose + conv grads, dgrad, wgrad).
"""

from .adapter_bwd import adapter_backward
from .adapter_fwd import adapter_forward

__all__ = ["adapter_forward", "adapter_backward"]
