"""The adapter and the LayerNorm after it as one op: ``(out, normed) = st_adapter_layernorm(...)``.

In every block we adapt, the adapter's output goes straight into a LayerNorm (norm1 / ln_1, or
norm2 / ln_2). Under the official recipe (bf16 backbone, LayerNorms computing in fp32, fp32
adapters, autocast) that LayerNorm saves an fp32 copy of its input -- 2 x x per adapted
position -- and the eager adapter saves about another x. The fused pair saves x and the
per-token mean and rstd (fp32, 8 bytes per token) and recomputes out in backward (one GEMM more
than the adapter's own backward): docs/design.md §7.

Registered with torch.library like the adapter op (custom_op + register_fake +
register_autograd: opcheck, torch.compile fullgraph). Backends: the reference (eager adapter +
F.layer_norm) and Triton (kernels/adapter_layernorm.py). The CUDA backend does not fuse the
LayerNorm: backend="cuda" raises naming the switch, "auto" picks Triton.
"""

from __future__ import annotations

import numbers
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends as _backends
from .ops import _autocast_on, _taps, check_inputs, resolve_backend
from .reference import reference_layernorm

__all__ = ["st_adapter_layernorm", "check_layernorm_inputs"]


def check_layernorm_inputs(x: Tensor, norm_weight: Optional[Tensor], norm_bias: Optional[Tensor],
                           norm_eps: float, normed_dtype: Optional[torch.dtype]) -> None:
    """The LayerNorm's side of a call: affine (C,) floating tensors on x's device (or None), a
    finite eps >= 0, a floating normed_dtype (or None). Errors name expected and actual."""
    c = x.shape[-1]
    for name, t in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape ({c},) or None, got {type(t).__name__}")
        if tuple(t.shape) != (c,):
            raise ValueError(f"{name} must have shape ({c},) (the LayerNorm over C), got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if isinstance(norm_eps, bool) or not isinstance(norm_eps, numbers.Real) or not norm_eps >= 0:
        raise ValueError(f"norm_eps must be a real number >= 0, got {norm_eps!r}")
    if normed_dtype is not None and (not isinstance(normed_dtype, torch.dtype) or not normed_dtype.is_floating_point):
        raise TypeError(f"normed_dtype must be a floating torch.dtype or None, got {normed_dtype!r}")


# ------------------------------------------------------------------- registered fused op
@torch.library.custom_op("st_adapter_fast::fused_adapter_layernorm", mutates_args=())
def fused_adapter_layernorm(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    norm_eps: float,
    normed_dtype: torch.dtype,
    num_frames: int,
    num_prefix_tokens: int,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(out (B*T, L, C) x's dtype, normed (B*T, L, C) normed_dtype, mean, rstd (B*T, L) fp32)."""
    impl = _backends.get_backend(backend)
    return tuple(impl.forward_layernorm(
        x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, _taps(conv_weight), conv_bias,
        fc2_weight, fc2_bias, norm_weight, norm_bias, norm_eps, normed_dtype,
    ))


@fused_adapter_layernorm.register_fake
def _fused_adapter_layernorm_fake(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                                  norm_weight, norm_bias, norm_eps, normed_dtype, num_frames, num_prefix_tokens,
                                  backend):
    stats = torch.empty(x.shape[:2], dtype=torch.float32, device=x.device)
    return (torch.empty(x.shape, dtype=x.dtype, device=x.device),
            torch.empty(x.shape, dtype=normed_dtype, device=x.device), stats, torch.empty_like(stats))


@torch.library.custom_op("st_adapter_fast::fused_adapter_layernorm_backward", mutates_args=())
def fused_adapter_layernorm_backward(
    grad_out: Tensor,
    grad_normed: Tensor,
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    mean: Tensor,
    rstd: Tensor,
    num_frames: int,
    num_prefix_tokens: int,
    affine_grads: bool,
    backend: str,
) -> List[Tensor]:
    """[dx, dfc1_w, dfc1_b, dconv_w, dconv_b, dfc2_w, dfc2_b, dnorm_w, dnorm_b] in the inputs'
    dtypes; an absent (or, affine_grads=False, unwanted) gradient is an empty tensor."""
    impl = _backends.get_backend(backend)
    dx, dwd, dbd, dtaps, dbc, dwu, dbu, dlnw, dlnb = impl.backward_layernorm(
        grad_out, grad_normed, x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, _taps(conv_weight),
        conv_bias, fc2_weight, fc2_bias, norm_weight, norm_bias, mean, rstd, affine_grads=affine_grads,
    )

    def cast(t: Optional[Tensor], like: Optional[Tensor], fresh: bool = False) -> Tensor:
        # outputs may not alias each other: a fresh empty tensor per absent gradient, and the
        # LayerNorm's two grads (rows of one buffer) copied out of it
        if t is None or like is None:
            return fc1_weight.new_empty((0,))
        t = t.to(like.dtype)
        return t.clone() if fresh else t

    return [
        dx.to(x.dtype), cast(dwd, fc1_weight), cast(dbd, fc1_bias),
        cast(dtaps, conv_weight).contiguous().reshape(conv_weight.shape), cast(dbc, conv_bias),
        cast(dwu, fc2_weight), cast(dbu, fc2_bias), cast(dlnw, norm_weight, True), cast(dlnb, norm_bias, True),
    ]


@fused_adapter_layernorm_backward.register_fake
def _fused_adapter_layernorm_backward_fake(grad_out, grad_normed, x, fc1_weight, fc1_bias, conv_weight, conv_bias,
                                           fc2_weight, fc2_bias, norm_weight, norm_bias, mean, rstd, num_frames,
                                           num_prefix_tokens, affine_grads, backend):
    def like(t, wanted=True):
        if t is None or not wanted:
            return fc1_weight.new_empty((0,))
        return torch.empty_like(t, memory_format=torch.contiguous_format)

    return [
        torch.empty(x.shape, dtype=x.dtype, device=x.device), like(fc1_weight), like(fc1_bias), like(conv_weight),
        like(conv_bias), like(fc2_weight), like(fc2_bias), like(norm_weight, affine_grads),
        like(norm_bias, affine_grads),
    ]


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, norm_weight, norm_bias,
     _eps, _dtype, t, p, backend) = inputs
    _out, _normed, mean, rstd = output
    # x, the parameters and the per-token statistics: out, normed and the fp32 copy are not kept
    ctx.save_for_backward(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                          norm_weight, norm_bias, mean, rstd)
    ctx.mark_non_differentiable(mean, rstd)
    ctx.num_frames, ctx.num_prefix_tokens, ctx.backend = t, p, backend
    ctx.present = tuple(v is not None for v in (fc1_bias, conv_bias, fc2_bias, norm_weight, norm_bias))


def _backward(ctx, grad_out, grad_normed, _grad_mean, _grad_rstd):
    (x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, norm_weight, norm_bias,
     mean, rstd) = ctx.saved_tensors
    affine = bool(ctx.needs_input_grad[7] or ctx.needs_input_grad[8])
    grads = fused_adapter_layernorm_backward(
        grad_out, grad_normed, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
        norm_weight, norm_bias, mean, rstd, ctx.num_frames, ctx.num_prefix_tokens, affine, ctx.backend,
    )
    dx, dwd, dbd, dwc, dbc, dwu, dbu, dlnw, dlnb = grads
    has_bd, has_bc, has_bu, has_lnw, has_lnb = ctx.present
    return (dx, dwd, dbd if has_bd else None, dwc, dbc if has_bc else None, dwu, dbu if has_bu else None,
            dlnw if has_lnw and affine else None, dlnb if has_lnb and affine else None,
            None, None, None, None, None)


fused_adapter_layernorm.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public function
def st_adapter_layernorm(
    x: Tensor,
    num_frames: int,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    *,
    norm_eps: float = 1e-5,
    normed_dtype: Optional[torch.dtype] = None,
    num_prefix_tokens: int = 1,
    grid_size: Optional[Sequence[int]] = None,
    backend: str = "auto",
    conv_cudnn: bool = True,
) -> Tuple[Tensor, Tensor]:
    """The adapter, then a LayerNorm over C: ``(out, normed)`` with ``out = st_adapter(x, ...)``
    and ``normed = layer_norm(out)``, computed in fp32.

    Args:
        x, num_frames, fc1_* , conv_*, fc2_*, num_prefix_tokens, grid_size, backend, conv_cudnn:
            as for st_adapter_fast.st_adapter (official switches only).
        norm_weight, norm_bias: the LayerNorm's affine (C,) (or None), any floating dtype;
            their gradients are computed only when one of them requires grad.
        norm_eps: the LayerNorm's eps.
        normed_dtype: the dtype of ``normed``: what the LayerNorm module the pair replaces
            returns. None = torch's F.layer_norm rule: float32 under autocast, else x's dtype
            (CLIP's fp32-compute LayerNorm returns its input's dtype: pass x.dtype).
    Returns:
        out (B*T, L, C) in x's dtype (the residual stream) and normed (B*T, L, C).

    Saved for backward (fused backends): x, the parameters, and fp32 mean/rstd per token.
    """
    check_inputs(x, num_frames, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                 num_prefix_tokens, grid_size)
    check_layernorm_inputs(x, norm_weight, norm_bias, norm_eps, normed_dtype)
    kernel_size = tuple(int(k) for k in conv_weight.shape[2:])
    params = [fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias]
    autocast = _autocast_on(x.device.type)
    if autocast:
        cast_to = torch.get_autocast_dtype(x.device.type)
        params = [p.to(cast_to) if p is not None else None for p in params]
    if normed_dtype is None:
        normed_dtype = torch.float32 if autocast else x.dtype
    name = resolve_backend(backend, x, kernel_size, params[0].dtype, layernorm=True)
    if name == "reference" or x.numel() == 0:
        return reference_layernorm(x, num_frames, *params, norm_weight, norm_bias, norm_eps=norm_eps,
                                   normed_dtype=normed_dtype, num_prefix_tokens=num_prefix_tokens,
                                   grid_size=grid_size, conv_cudnn=conv_cudnn)
    out, normed, _mean, _rstd = fused_adapter_layernorm(
        x, *params, norm_weight, norm_bias, float(norm_eps), normed_dtype, num_frames, num_prefix_tokens, name)
    return out, normed
