"""The Triton backend: the fused kernels of kernels/ (installed as st_adapter_fast.kernels).

Imported lazily, so ``import st_adapter_fast`` works without triton; ``unavailable_reason`` says
why a call cannot run here (triton missing, CPU tensor without the interpreter, unsupported case).
"""

from __future__ import annotations

import os
import sys
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


# When TRITON_INTERPRET must be set, found by experiment (triton 3.9, CPU): triton.jit decides at
# decoration time whether a function is interpreted, and triton decorates its own helpers
# (triton.language.standard) when triton is imported. Setting the flag after `import triton`
# gives "InterpreterError: Cannot call @triton.jit'd outside of the scope of a kernel" at the
# first kernel call. `import st_adapter_fast` (and its models) does not import triton; the first
# Triton-backend call (or backend_status) does. So: before triton is first imported.
_WHEN = "TRITON_INTERPRET=1 must be set before triton is first imported in the process"


def _interpreter_problem(common) -> Optional[str]:
    """None if the interpreter can run the kernels (CPU tensors), else why not."""
    if not common.INTERPRET:
        return (f"CPU tensors run the Triton kernels only in the Triton interpreter, and {_WHEN}; "
                "triton is already imported here without it (st_adapter_fast imports triton at the first "
                "Triton-backend call), so restart with TRITON_INTERPRET=1 in the environment")
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    helper = getattr(tl.standard, "cdiv", None)  # one of triton's own @jit functions
    if isinstance(helper, JITFunction) and not isinstance(helper, InterpretedFunction):
        return (f"TRITON_INTERPRET=1 was set after triton had been imported; {_WHEN} (triton decorates "
                "its own functions at import), so restart with TRITON_INTERPRET=1 in the environment")
    return None


def _triton_unavailable(x: torch.Tensor, kernel_size: Sequence[int], dtype: torch.dtype,
                        variant=None) -> Optional[str]:
    """None if the Triton kernels can run this call, else why not. Meta tensors need no device:
    the case checks still apply and the op's registered fake gives the shape."""
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1" and "triton" not in sys.modules:
        # answer without importing triton, so setting the flag now still works
        return (f"CPU tensors run the Triton kernels only in the Triton interpreter: {_WHEN}. Nothing has "
                "imported triton yet, so os.environ['TRITON_INTERPRET'] = '1' now, before the first Triton "
                "call, still works (or set it in the environment)")
    mods = _triton_kernels()
    if mods is None:
        return _TRITON_IMPORT_ERROR
    common = mods[2]
    if x.device.type == "cpu":
        problem = _interpreter_problem(common)
        if problem is not None:
            return problem
    elif x.device.type == "meta":
        pass  # shapes only (the fake of st_adapter_fast::fused_adapter); no device to check
    elif x.device.type != "cuda":
        return f"the Triton backend runs on CUDA tensors, got device {x.device}"
    elif common.INTERPRET:
        return ("TRITON_INTERPRET=1 is set, so the kernels can only run on CPU tensors (unset it before "
                "triton is first imported to compile them for the GPU)")
    if dtype not in FUSED_DTYPES or x.dtype not in FUSED_DTYPES:
        return f"the Triton backend supports float32/float16/bfloat16, got {x.dtype} activations and {dtype} weights"
    kt, kh, kw = kernel_size
    if kt > common.MAX_FUSED_KT:
        return f"kernel_size {tuple(kernel_size)}: temporal kernels up to {common.MAX_FUSED_KT} are fused"
    max_khw = mods[0].adapter_stencil.MAX_FUSED_KHW  # spatial kernels: kernels/adapter_stencil.py
    if kh > max_khw or kw > max_khw:
        return (f"kernel_size {tuple(kernel_size)}: spatial kernels up to kh, kw = {max_khw} are fused "
                f"(kt up to {common.MAX_FUSED_KT})")
    # docs/design.md §9: norm (the LayerNorm before fc1, kernels/adapter_prenorm.py), activations,
    # scale, DropPath and prefix_mode="mlp" are fused, with temporal and spatial kernels alike
    return None


def _triton_forward(*args, **switches):
    """switches: act_after_fc1, act_after_conv, scale, drop_draw, drop_path (adapter_forward)."""
    return _triton_kernels()[0].adapter_forward(*args, **switches)


def _triton_backward(*args, **switches):
    """The 7 gradients of adapter_backward, and d(scale) as an 8th when a scale is passed."""
    return _triton_kernels()[1].adapter_backward(*args, **switches)


def _triton_layernorm_forward(*args):
    from ..kernels import adapter_layernorm

    return adapter_layernorm.adapter_layernorm_forward(*args)


def _triton_layernorm_backward(*args, **kwargs):
    from ..kernels import adapter_layernorm

    return adapter_layernorm.adapter_layernorm_backward(*args, **kwargs)


BACKEND = Backend("triton", _triton_unavailable, _triton_forward, _triton_backward, variant_aware=True,
                  forward_layernorm=_triton_layernorm_forward, backward_layernorm=_triton_layernorm_backward)
