"""Fused-kernel backends behind the ST-Adapter op, and the registry the dispatch reads.

A backend computes the fused forward and the recompute backward for the cases it supports.
Each one says *why* it cannot run a call (``unavailable_reason``), so an explicit request fails
with that reason and ``backend="auto"`` can fall back to the reference naming the case.

Backend functions take conv taps as a contiguous (Ca, KT) tensor (conv.weight reshaped), x and
dO with any strides, and return (see kernels.adapter_bwd.adapter_backward):
  forward(x, T, P, Wd, bd, taps, bc, Wu, bu) -> out (B*T, L, C), x's dtype, contiguous
  backward(dO, x, T, P, Wd, bd, taps, bc, Wu, bu) -> (dx, dWd, dbd, dtaps (Ca, KT), dbc, dWu, dbu)
with parameter gradients in fp32 or in the parameters' dtype (ops casts to the latter; the Triton
backend reduces in fp32 and casts in its last launch), None for absent biases.
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


def _missing(*args):
    raise RuntimeError("this backend is not available")


_BUILTIN_DONE = False


def _ensure_builtin() -> None:
    global _BUILTIN_DONE
    if _BUILTIN_DONE:
        return
    _BUILTIN_DONE = True
    from . import triton as triton_backend

    _REGISTRY.setdefault("triton", triton_backend.BACKEND)
    try:
        from . import cuda as cuda_backend
    except ImportError:
        cuda_backend = None
    if cuda_backend is not None and hasattr(cuda_backend, "BACKEND"):
        _REGISTRY.setdefault("cuda", cuda_backend.BACKEND)
    else:
        _REGISTRY.setdefault(
            "cuda",
            Backend("cuda", lambda x, k, d: "the CUDA backend is not part of this build yet", _missing, _missing),
        )
