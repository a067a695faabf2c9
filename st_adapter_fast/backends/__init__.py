"""Fused-kernel backends behind the ST-Adapter op, and the registry the dispatch reads.

A backend computes the fused forward and the recompute backward for the cases it supports.
Each one says *why* it cannot run a call (``unavailable_reason``), so an explicit request fails
with that reason and ``backend="auto"`` can fall back to the reference naming the case.

Variant switches (docs/design.md §9): dispatch asks ``Backend.reason(x, kernel_size, dtype,
variant)``. A backend registered with ``variant_aware=True`` gets the call's
st_adapter_fast.variants.Variant as a ``variant=`` keyword of its unavailable_reason (None for
the official switches) and decides; any other backend keeps its 3-argument unavailable_reason
and is refused every non-official switch, by name.

Backend functions take conv taps as a contiguous (Ca, KT) tensor (conv.weight reshaped; a
spatial kernel, kh or kw > 1, as (Ca, KT, KH, KW)), x and
dO with any strides, and return (see kernels.adapter_bwd.adapter_backward):
  forward(x, T, P, Wd, bd, taps, bc, Wu, bu) -> out (B*T, L, C), x's dtype, contiguous
  backward(dO, x, T, P, Wd, bd, taps, bc, Wu, bu) -> (dx, dWd, dbd, dtaps (Ca, KT), dbc, dWu, dbu)
with parameter gradients in fp32 or in the parameters' dtype (ops casts to the latter; the Triton
backend reduces in fp32 and casts in its last launch), None for absent biases. A backend whose
unavailable_reason accepts a §9 switch the fused op takes (act_after_fc1, act_after_conv, scale,
DropPath) gets it as keyword arguments of both (act_after_fc1=, act_after_conv=, scale= a 0-dim
tensor, drop_draw= the (B,) float32 0/1 per-clip draw with drop_path= p; grid_size= (H, W) with
a spatial kernel; norm= (weight or None, bias or None, eps) with the LayerNorm before fc1;
prefix_mlp=True with prefix_mode="mlp"; only those set). Its backward appends d(scale) when
scale= is passed, then (d norm weight, d norm bias) (None where absent) when norm= is.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Optional, Sequence

import torch

__all__ = ["Backend", "BackendStatus", "register_backend", "get_backend", "available_backends", "backend_status",
           "FUSED_DTYPES"]

FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYERNORM_SWITCH = "fuse_layernorm (the adapter + LayerNorm pair, st_adapter_layernorm)"


@dataclasses.dataclass
class Backend:
    name: str
    # (x, kernel_size (kt, kh, kw), compute dtype) -> None if it can run this call, else why not
    unavailable_reason: Callable[[torch.Tensor, Sequence[int], torch.dtype], Optional[str]]
    forward: Callable
    backward: Callable
    # picked by backend="auto" (a test-only backend registers with auto=False)
    auto: bool = True
    # unavailable_reason takes variant= (a Variant, or None for the official switches)
    variant_aware: bool = False
    # the adapter + LayerNorm pair (st_adapter_fast.adapter_layernorm), None where not fused:
    #   forward_layernorm(x, T, P, Wd, bd, taps, bc, Wu, bu, ln_w, ln_b, eps, normed_dtype)
    #     -> (out, normed, mean (B*T, L) fp32, rstd)
    #   backward_layernorm(d_out, d_normed, x, T, P, Wd, bd, taps, bc, Wu, bu, ln_w, ln_b, mean, rstd,
    #                      affine_grads=) -> backward's 7 grads + (d_ln_w, d_ln_b)
    forward_layernorm: Optional[Callable] = None
    backward_layernorm: Optional[Callable] = None

    def reason(self, x: torch.Tensor, kernel_size: Sequence[int], dtype: torch.dtype,
               variant=None, *, layernorm: bool = False) -> Optional[str]:
        """None if this backend can run the call, else why not; variant: the call's
        st_adapter_fast.variants.Variant, None (or an official one) for the official module;
        layernorm: the call is the adapter + LayerNorm pair (forward_layernorm)."""
        if layernorm and self.forward_layernorm is None:
            return (f"the {self.name} backend does not fuse the LayerNorm after the adapter ({LAYERNORM_SWITCH}); "
                    f"use backend='triton' or 'auto', or run the adapter and the LayerNorm separately "
                    f"(inject_st_adapters(..., fuse_layernorm=False))")
        if variant is None or variant.official:
            return self.unavailable_reason(x, kernel_size, dtype)
        if self.variant_aware:
            return self.unavailable_reason(x, kernel_size, dtype, variant=variant)
        return f"the {self.name} backend fuses only the official switches, not {variant.describe()}"


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


def available_backends(device=None) -> list:
    """Backend names, "reference" first.

    device=None: every registered backend, whether or not it can run here (what ``backend=``
    accepts). device="cpu" / "cuda" / a torch.device: only those that can run a float32
    (3, 1, 1) adapter on tensors of that device; :func:`backend_status` says why the others
    cannot.
    """
    _ensure_builtin()
    if device is None:
        return ["reference", *_REGISTRY]
    return [s.name for s in backend_status(device) if s.usable]


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    usable: bool  # can run a float32 (3, 1, 1) adapter on tensors of ``device``
    device: str
    reason: Optional[str] = None  # why not, when not usable

    def __str__(self) -> str:
        return f"{self.name}: {'usable' if self.usable else 'not usable'} on {self.device}" + (
            f" ({self.reason})" if self.reason else "")


def backend_status(device=None, *, dtype: torch.dtype = torch.float32,
                   kernel_size: Sequence[int] = (3, 1, 1)) -> list:
    """[BackendStatus] for "reference" and every registered backend on ``device`` (default: "cuda"
    when a GPU is visible, else "cpu"): registered is not the same as usable here.

    Each fused backend answers with the reason it gives an explicit ``backend=`` request, for a
    probe tensor of ``dtype`` on that device and ``kernel_size``. Asking about "cuda" on a GPU
    machine may JIT-build the CUDA extension once (as its first call would).
    """
    _ensure_builtin()
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    probe, no_device = None, None
    if device.type == "cuda" and not torch.cuda.is_available():
        no_device = ("no CUDA device here (torch.cuda.is_available() is False"
                     + (f"; torch {torch.__version__} is a CPU-only build)" if torch.version.cuda is None else ")"))
    else:
        probe = torch.zeros(1, 2, 8, device=device, dtype=dtype)  # (B*T, L, C): CLS + one token
    statuses = [BackendStatus("reference", no_device is None, str(device), no_device)]
    for name, backend in _REGISTRY.items():
        reason = no_device if probe is None else backend.unavailable_reason(probe, tuple(kernel_size), dtype)
        statuses.append(BackendStatus(name, reason is None, str(device), reason))
    return statuses


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
