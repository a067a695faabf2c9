"""The Triton backend: the fused kernels of kernels/ (installed as st_adapter_fast.kernels).

Imported lazily, so ``import st_adapter_fast`` works without triton; ``unavailable_reason`` says
why a call cannot run here (triton missing, CPU tensor without the interpreter, unsupported case).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import FUSED_DTYPES, Backend

_TRITON_IMPORT_ERROR: Optional[str] = None


def _triton_kernels():
    """Import the Triton kernels lazily: `import st_adapter_fast` works without triton."""
    global _TRITON_IMPORT_ERROR
    try:
        # st_adapter_fast.kernels is installed from the top-level kernels/ directory
        from ..kernels import _common, adapter_bwd, adapter_fwd
    except ImportError as err:  # triton missing or broken
        _TRITON_IMPORT_ERROR = f"triton is not importable ({err})"
        return None
    return adapter_fwd, adapter_bwd, _common


def _triton_unavailable(x: torch.Tensor, kernel_size: Sequence[int], dtype: torch.dtype) -> Optional[str]:
    mods = _triton_kernels()
    if mods is None:
        return _TRITON_IMPORT_ERROR
    common = mods[2]
    if x.device.type == "cpu":
        if not common.INTERPRET:
            return ("CPU tensors run the Triton kernels only in the interpreter "
                    "(set TRITON_INTERPRET=1 before importing st_adapter_fast)")
    elif x.device.type != "cuda":
        return f"the Triton backend runs on CUDA tensors, got device {x.device}"
    elif common.INTERPRET:
        return "TRITON_INTERPRET=1 is set, so the kernels can only run on CPU tensors"
    if dtype not in FUSED_DTYPES or x.dtype not in FUSED_DTYPES:
        return f"the Triton backend supports float32/float16/bfloat16, got {x.dtype} activations and {dtype} weights"
    kt, kh, kw = kernel_size
    if kh != 1 or kw != 1:
        return f"kernel_size {tuple(kernel_size)}: only temporal kernels (kt, 1, 1) are fused"
    if kt > common.MAX_FUSED_KT:
        return f"kernel_size {tuple(kernel_size)}: temporal kernels up to {common.MAX_FUSED_KT} are fused"
    return None


def _triton_forward(*args):
    return _triton_kernels()[0].adapter_forward(*args)


def _triton_backward(*args):
    return _triton_kernels()[1].adapter_backward(*args)


BACKEND = Backend("triton", _triton_unavailable, _triton_forward, _triton_backward)
