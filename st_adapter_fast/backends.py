"""Fused-kernel backends behind the ST-Adapter op, and the registry the dispatch reads.

A backend computes the fused forward and the recompute backward for the cases it supports.
Each one says *why* it cannot run a call (``unavailable_reason``), so an explicit request fails
with that reason and ``backend="auto"`` can fall back to the reference naming the case.

Backend functions take conv taps as a contiguous (Ca, KT) tensor (conv.weight reshaped), x and
dO with any strides, and return (see kernels.adapter_bwd.adapter_backward):
  forward(x, T, P, Wd, bd, taps, bc, Wu, bu) -> out (B*T, L, C), x's dtype, contiguous
  backward(dO, x, T, P, Wd, bd, taps, bc, Wu, bu) -> (dx, dWd, dbd, dtaps (Ca, KT), dbc, dWu, dbu)
with fp32 parameter gradients (None for absent biases).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["Backend", "register_backend", "get_backend", "available_backends", "FUSED_DTYPES"]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclasses.dataclass
class Backend:
    name: str
    # (x, kernel_size (kt, kh, kw), compute dtype) -> None if it can run this call, else why not
    unavailable_reason: Callable[[torch.Tensor, Sequence[int], torch.dtype], Optional[str]]
    forward: Callable
    backward: Callable
    # picked by backend="auto" (a test-only backend registers with auto=False)
    auto: bool = True


_REGISTRY: Dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> None:
    """Add a fused backend (tests register deliberately wrong ones to prove the checks fail)."""
    if backend.name in ("auto", "reference"):
        raise ValueError(f"backend name {backend.name!r} is reserved")
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"backend {backend.name!r} is already registered")
    _REGISTRY[backend.name] = backend


def unregister_backend(name: str) -> None:
    _REGISTRY.pop(name, None)


def get_backend(name: str) -> Backend:
    _ensure_builtin()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; expected one of {['auto', 'reference', *sorted(_REGISTRY)]}"
        ) from None


def available_backends() -> list:
    _ensure_builtin()
    return ["reference", *_REGISTRY]


# ------------------------------------------------------------------------------------ triton
_TRITON_IMPORT_ERROR: Optional[str] = None


def _triton_kernels():
    """Import the Triton kernels lazily: `import st_adapter_fast` works without triton."""
    global _TRITON_IMPORT_ERROR
    try:
        # st_adapter_fast.kernels is installed from the top-level kernels/ directory
        from .kernels import _common, adapter_bwd, adapter_fwd
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


def _missing(*args):
    raise RuntimeError("this backend is not available")


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    _REGISTRY.setdefault("triton", Backend("triton", _triton_unavailable, _triton_forward, _triton_backward))
    try:
        from . import cuda_backend
    except ImportError:
        cuda_backend = None
    if cuda_backend is not None and hasattr(cuda_backend, "BACKEND"):
        _REGISTRY.setdefault("cuda", cuda_backend.BACKEND)
    else:
        _REGISTRY.setdefault(
            "cuda",
            Backend("cuda", lambda x, k, d: "the CUDA backend is not part of this build yet", _missing, _missing),
        )
