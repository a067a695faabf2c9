"""The functional ST-Adapter op: input checks, backend dispatch, autocast, and the fused path
registered with torch.library (custom_op + register_fake + register_autograd), so
torch.compile(fullgraph=True) traces it as one opaque op and torch.library.opcheck passes.

Only x and the parameters are saved for backward; the backend recomputes h and g.
"""

from __future__ import annotations

import numbers
import warnings
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends as _backends
from .reference import infer_grid, reference
from .variants import Variant, check_drop_path

__all__ = ["st_adapter", "resolve_backend", "check_inputs", "check_variant_inputs"]

BACKEND_NAMES = ("auto", "reference", "triton", "cuda")


# ------------------------------------------------------------------------------ input checks
def _describe(t: Optional[Tensor]) -> str:
    if t is None:
        return "None"
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def check_inputs(
    x: Tensor,
    num_frames: int,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    num_prefix_tokens: int,
    grid_size: Optional[Sequence[int]],
) -> Tuple[int, int, Tuple[int, int, int]]:
    """Validate a call; returns (C, Ca, kernel_size). Raises TypeError / ValueError that name the
    expected and the actual shapes, dtypes and devices."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B*T, L, C), got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must have shape (B*T, L, C) (3 dims), got {tuple(x.shape)} ({x.dim()} dims)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    bt, seq_len, c = x.shape
    if bt % num_frames != 0:
        raise ValueError(
            f"x.shape[0] = B*T = {bt} is not divisible by num_frames = {num_frames}"
        )
    if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral):
        raise TypeError(f"num_prefix_tokens must be an int, got {type(num_prefix_tokens).__name__}")
    if not 0 <= num_prefix_tokens <= seq_len:
        raise ValueError(f"num_prefix_tokens must be in [0, L={seq_len}], got {num_prefix_tokens}")
    infer_grid(seq_len - num_prefix_tokens, grid_size)

    named = {
        "fc1_weight": fc1_weight, "fc1_bias": fc1_bias, "conv_weight": conv_weight,
        "conv_bias": conv_bias, "fc2_weight": fc2_weight, "fc2_bias": fc2_bias,
    }
    for name, t in named.items():
        if t is None and name.endswith("bias"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if fc1_weight.dim() != 2 or fc1_weight.shape[1] != c:
        raise ValueError(f"fc1_weight must have shape (Ca, C={c}), got {tuple(fc1_weight.shape)}")
    ca = fc1_weight.shape[0]
    if conv_weight.dim() != 5 or conv_weight.shape[0] != ca or conv_weight.shape[1] != 1:
        raise ValueError(
            f"conv_weight must have shape (Ca={ca}, 1, kt, kh, kw) (depthwise), got {tuple(conv_weight.shape)}"
        )
    kernel_size = tuple(int(k) for k in conv_weight.shape[2:])
    if any(k % 2 == 0 for k in kernel_size):
        raise ValueError(f"kernel size must be odd in every dim (padding k//2 keeps shapes), got {kernel_size}")
    if fc2_weight.dim() != 2 or tuple(fc2_weight.shape) != (c, ca):
        raise ValueError(f"fc2_weight must have shape (C={c}, Ca={ca}), got {tuple(fc2_weight.shape)}")
    for name, t, n in (("fc1_bias", fc1_bias, ca), ("conv_bias", conv_bias, ca), ("fc2_bias", fc2_bias, c)):
        if t is not None and tuple(t.shape) != (n,):
            raise ValueError(f"{name} must have shape ({n},), got {tuple(t.shape)}")

    params = [t for t in named.values() if t is not None]
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
    dtypes = {t.dtype for t in params}
    if len(dtypes) != 1:
        detail = ", ".join(f"{n}={t.dtype}" for n, t in named.items() if t is not None)
        raise TypeError(f"all adapter parameters must share one dtype, got {detail}")
    (pdtype,) = dtypes
    if not pdtype.is_floating_point:
        raise TypeError(f"adapter parameters must be floating point, got {pdtype}")
    if pdtype != x.dtype and not _autocast_on(x.device.type):
        raise TypeError(
            f"x is {x.dtype} but the adapter parameters are {pdtype}; cast one of them "
            f"or run under torch.autocast"
        )
    return c, ca, kernel_size


def _autocast_on(device_type: str) -> bool:
    """torch.is_autocast_enabled for x's device; False where autocast does not exist (meta
    tensors: torch.is_autocast_enabled("meta") raises "unknown device type for autocast")."""
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def check_variant_inputs(
    x: Tensor,
    param_dtype: torch.dtype,
    *,
    norm: Optional[str],
    norm_weight: Optional[Tensor],
    norm_bias: Optional[Tensor],
    act_after_fc1: Optional[str],
    act_after_conv: Optional[str],
    prefix_mode: str,
    scale: Optional[Tensor],
    drop_path: float,
    training: bool,
) -> Variant:
    """Validate docs/design.md §9's switches of a call; returns its Variant (drop_path as in
    effect: 0 unless training). Errors name the expected and actual shapes, dtypes, devices."""
    c = x.shape[-1]
    check_drop_path(drop_path)
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    variant = Variant(norm=norm, act_after_fc1=act_after_fc1, act_after_conv=act_after_conv,
                      prefix_mode=prefix_mode, scale=scale is not None,
                      drop_path=float(drop_path) if training else 0.0)
    if norm is None and (norm_weight is not None or norm_bias is not None):
        raise ValueError("norm_weight / norm_bias were given but norm is None; pass norm='layernorm'")
    extra = {"norm_weight": (norm_weight, (c,)), "norm_bias": (norm_bias, (c,)), "scale": (scale, ())}
    for name, (t, shape) in extra.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape {shape}, got {type(t).__name__}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; all tensors must share a device")
        if t.dtype != param_dtype:
            raise TypeError(f"{name} is {t.dtype} but the adapter parameters are {param_dtype}; "
                            f"all adapter parameters must share one dtype")
    return variant


# ---------------------------------------------------------------------------- backend choice
_WARNED: set = set()


def _warn_once(msg: str) -> None:
    if msg not in _WARNED:
        _WARNED.add(msg)
        warnings.warn(msg, stacklevel=3)


# devices whose tensors "auto" offers to the fused backends (CPU: eager PyTorch is the fast path)
AUTO_FUSED_DEVICES = ("cuda",)


def resolve_backend(
    backend: str, x: Tensor, kernel_size: Sequence[int], compute_dtype: torch.dtype,
    variant: Optional[Variant] = None, *, layernorm: bool = False,
) -> str:
    """The backend that runs this call: 'reference' or a registered fused backend.

    An explicitly named backend that cannot run it raises ValueError/RuntimeError with the
    reason; 'auto' takes the first fused backend that can (on CUDA tensors), else the reference,
    warning once per case when a CUDA call falls back. ``variant`` (docs/design.md §9 switches,
    None = official) goes to each backend's unavailable_reason (Backend.reason). Meta tensors
    under "auto" run the reference (shapes only); a named fused backend on meta tensors runs
    its registered fake (st_adapter_fast::fused_adapter) where it covers the case. layernorm:
    the call is the adapter + LayerNorm pair (st_adapter_fast.adapter_layernorm), which only
    backends with forward_layernorm run.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    if backend == "reference":
        return backend
    if backend != "auto":
        impl = _backends.get_backend(backend)  # ValueError for unknown names
        reason = impl.reason(x, kernel_size, compute_dtype, variant, layernorm=layernorm)
        if reason is not None:
            raise RuntimeError(f"backend={backend!r} cannot run this call: {reason}")
        return backend
    if x.device.type not in AUTO_FUSED_DEVICES:
        return "reference"  # CPU: eager PyTorch is the fast path (the interpreter is for tests)
    reasons = []
    for name in _backends.available_backends():
        if name == "reference":
            continue
        impl = _backends.get_backend(name)
        if not impl.auto:
            continue
        reason = impl.reason(x, kernel_size, compute_dtype, variant, layernorm=layernorm)
        if reason is None:
            return name
        reasons.append(f"{name}: {reason}")
    _warn_once("st_adapter: no fused backend covers this case, using the reference ("
               + "; ".join(reasons) + ")")
    return "reference"


# ------------------------------------------------------------------- registered fused op
def _taps(conv_weight: Tensor) -> Tensor:
    """(Ca, 1, kt, kh, kw) depthwise kernel -> contiguous (Ca, kt) for a temporal kernel
    (kh = kw = 1), else contiguous (Ca, kt, kh, kw): the backends' taps layout."""
    ca, _, kt, kh, kw = conv_weight.shape
    if kh == 1 and kw == 1:
        return conv_weight.reshape(ca, kt).contiguous()
    return conv_weight.reshape(ca, kt, kh, kw).contiguous()


@torch.library.custom_op("st_adapter_fast::fused_adapter", mutates_args=())
def fused_adapter(
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    num_frames: int,
    num_prefix_tokens: int,
    backend: str,
    scale: Optional[Tensor] = None,
    drop_draw: Optional[Tensor] = None,
    drop_path: float = 0.0,
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    grid_h: int = 0,
    grid_w: int = 0,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    has_norm: bool = False,
    prefix_mlp: bool = False,
) -> Tensor:
    """Fused forward with a named backend. x: (B*T, L, C) -> new (B*T, L, C), x's dtype.

    docs/design.md §9 switches the fused op takes: scale (0-dim), DropPath (drop_draw: the (B,)
    float32 0/1 per-clip draw of drop_path_draw, drop_path: p), the activations, the (H, W) grid
    of a spatial kernel (grid_h, grid_w; read only when kh or kw > 1), the LayerNorm before fc1
    (has_norm, with norm_weight / norm_bias (C,) or None and norm_eps) and prefix_mode="mlp"
    (prefix_mlp)."""
    impl = _backends.get_backend(backend)
    return impl.forward(
        x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, _taps(conv_weight), conv_bias,
        fc2_weight, fc2_bias, **_switch_kwargs(scale, drop_draw, drop_path, act_after_fc1, act_after_conv,
                                               conv_weight, grid_h, grid_w, norm_weight, norm_bias, norm_eps,
                                               has_norm, prefix_mlp),
    )


def _switch_kwargs(scale, drop_draw, drop_path, act_after_fc1, act_after_conv, conv_weight=None,
                   grid_h=0, grid_w=0, norm_weight=None, norm_bias=None, norm_eps=1e-5, has_norm=False,
                   prefix_mlp=False) -> dict:
    """The §9 keyword arguments of a backend's forward / backward; none for the official switches
    (so a backend fusing only those keeps its plain signature): grid_size=(H, W) only for a
    spatial kernel, norm=(weight, bias, eps) only with the LayerNorm, prefix_mlp only when set."""
    kwargs = dict(scale=scale, act_after_fc1=act_after_fc1, act_after_conv=act_after_conv)
    if drop_path > 0:
        kwargs.update(drop_draw=drop_draw, drop_path=drop_path)
    if conv_weight is not None and tuple(conv_weight.shape[3:]) != (1, 1):
        kwargs["grid_size"] = (grid_h, grid_w)
    if has_norm:
        kwargs["norm"] = (norm_weight, norm_bias, float(norm_eps))
    if prefix_mlp:
        kwargs["prefix_mlp"] = True
    return {k: v for k, v in kwargs.items() if v is not None}


def drop_path_draw(num_clips: int, p: float, device) -> Tensor:
    """(num_clips,) float32 0/1: DropPath's per-clip keep draw, one RNG op. The same draw as
    reference.drop_path_mask (float32 Bernoulli(1 - p) over a (num_clips, 1, 1, 1) tensor), so a
    fused and a reference run from one seed drop the same clips; the kernels divide by 1 - p."""
    return torch.empty((num_clips, 1, 1, 1), dtype=torch.float32, device=device).bernoulli_(1.0 - p).view(num_clips)


@fused_adapter.register_fake
def _fused_adapter_fake(x, *args, **kwargs):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("st_adapter_fast::fused_adapter_backward", mutates_args=())
def fused_adapter_backward(
    grad_out: Tensor,
    x: Tensor,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    num_frames: int,
    num_prefix_tokens: int,
    backend: str,
    scale: Optional[Tensor] = None,
    drop_draw: Optional[Tensor] = None,
    drop_path: float = 0.0,
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    grid_h: int = 0,
    grid_w: int = 0,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    has_norm: bool = False,
    prefix_mlp: bool = False,
) -> List[Tensor]:
    """[dx, dfc1_w, dfc1_b, dconv_w, dconv_b, dfc2_w, dfc2_b, dscale, dnorm_w, dnorm_b] in the
    inputs' dtypes; the grad of an absent bias, scale or norm affine is an empty tensor (the
    autograd formula turns it into None). The switches as fused_adapter's."""
    impl = _backends.get_backend(backend)
    grads = impl.backward(
        grad_out, x, num_frames, num_prefix_tokens, fc1_weight, fc1_bias, _taps(conv_weight),
        conv_bias, fc2_weight, fc2_bias,
        **_switch_kwargs(scale, drop_draw, drop_path, act_after_fc1, act_after_conv, conv_weight, grid_h, grid_w,
                         norm_weight, norm_bias, norm_eps, has_norm, prefix_mlp),
    )
    dx, dwd, dbd, dtaps, dbc, dwu, dbu = grads[:7]
    # backends append d(scale) when scale= is passed, then (d norm weight, d norm bias) with norm=
    extra = list(grads[7:])
    dscale = extra.pop(0) if scale is not None else None
    dnw, dnb = (extra[0], extra[1]) if has_norm else (None, None)
    pdtype = fc1_weight.dtype

    def cast(t: Optional[Tensor], dtype=pdtype) -> Tensor:
        # outputs may not alias each other: a fresh empty tensor per absent bias
        return fc1_weight.new_empty((0,)) if t is None else t.to(dtype)

    return [
        dx.to(x.dtype), cast(dwd), cast(dbd), cast(dtaps).contiguous().reshape(conv_weight.shape), cast(dbc),
        cast(dwu), cast(dbu), cast(dscale, scale.dtype if scale is not None else pdtype),
        cast(dnw, norm_weight.dtype if norm_weight is not None else pdtype),
        cast(dnb, norm_bias.dtype if norm_bias is not None else pdtype),
    ]


@fused_adapter_backward.register_fake
def _fused_adapter_backward_fake(grad_out, x, fc1_weight, fc1_bias, conv_weight, conv_bias,
                                 fc2_weight, fc2_bias, num_frames, num_prefix_tokens, backend, scale=None,
                                 drop_draw=None, drop_path=0.0, act_after_fc1=None, act_after_conv=None,
                                 grid_h=0, grid_w=0, norm_weight=None, norm_bias=None, norm_eps=1e-5,
                                 has_norm=False, prefix_mlp=False):
    def like(t):
        return fc1_weight.new_empty((0,)) if t is None else torch.empty_like(t, memory_format=torch.contiguous_format)

    return [
        torch.empty(x.shape, dtype=x.dtype, device=x.device), like(fc1_weight), like(fc1_bias),
        like(conv_weight), like(conv_bias), like(fc2_weight), like(fc2_bias), like(scale),
        like(norm_weight if has_norm else None), like(norm_bias if has_norm else None),
    ]


def _setup_context(ctx, inputs, output):
    (x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, t, p, backend,
     scale, drop_draw, drop_path, act1, act2, grid_h, grid_w, norm_weight, norm_bias, norm_eps, has_norm,
     prefix_mlp) = inputs
    # Only x and the parameters (scale and the norm affine among them), plus DropPath's (B,)
    # per-clip draw: the LayerNorm statistics, h, g and the conv input are recomputed in backward.
    ctx.save_for_backward(x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, scale, drop_draw,
                          norm_weight, norm_bias)
    ctx.num_frames, ctx.num_prefix_tokens, ctx.backend = t, p, backend
    ctx.switches = (drop_path, act1, act2, grid_h, grid_w)
    ctx.norm = (norm_eps, has_norm, prefix_mlp)
    ctx.has_bias = (fc1_bias is not None, conv_bias is not None, fc2_bias is not None)


def _backward(ctx, grad_out):
    (x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias, scale, drop_draw, norm_weight,
     norm_bias) = ctx.saved_tensors
    norm_eps, has_norm, prefix_mlp = ctx.norm
    dx, dwd, dbd, dwc, dbc, dwu, dbu, dscale, dnw, dnb = fused_adapter_backward(
        grad_out, x, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
        ctx.num_frames, ctx.num_prefix_tokens, ctx.backend, scale, drop_draw, *ctx.switches,
        norm_weight, norm_bias, norm_eps, has_norm, prefix_mlp,
    )
    has_bd, has_bc, has_bu = ctx.has_bias
    return (
        dx, dwd, dbd if has_bd else None, dwc, dbc if has_bc else None, dwu,
        dbu if has_bu else None, None, None, None, dscale if scale is not None else None, None, None, None, None,
        None, None, dnw if norm_weight is not None else None, dnb if norm_bias is not None else None,
        None, None, None,
    )


fused_adapter.register_autograd(_backward, setup_context=_setup_context)


# ------------------------------------------------------------------------- public function
def st_adapter(
    x: Tensor,
    num_frames: int,
    fc1_weight: Tensor,
    fc1_bias: Optional[Tensor],
    conv_weight: Tensor,
    conv_bias: Optional[Tensor],
    fc2_weight: Tensor,
    fc2_bias: Optional[Tensor],
    *,
    num_prefix_tokens: int = 1,
    grid_size: Optional[Sequence[int]] = None,
    inplace: bool = False,
    backend: str = "auto",
    conv_cudnn: bool = True,
    norm: Optional[str] = None,
    norm_weight: Optional[Tensor] = None,
    norm_bias: Optional[Tensor] = None,
    norm_eps: float = 1e-5,
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    prefix_mode: str = "skip",
    scale: Optional[Tensor] = None,
    drop_path: float = 0.0,
    training: bool = False,
) -> Tensor:
    """ST-Adapter: ``x[:, P:] + fc2(conv3d(fc1(x[:, P:])))``, prefix tokens passed through.

    Args:
        x: (B*T, L, C) with the frames of a clip contiguous (row b*T + t); any strides.
        num_frames: T.
        fc1_weight (Ca, C), fc1_bias (Ca,), conv_weight (Ca, 1, kt, kh, kw), conv_bias (Ca,),
        fc2_weight (C, Ca), fc2_bias (C,): the official Adapter's parameters (biases may be None).
        num_prefix_tokens: P tokens per frame (CLS, registers) left unchanged.
        grid_size: (H, W) of the L - P spatial tokens; a square is inferred when None.
        inplace: write the result into x and return x, like the official module. Autograd
            works as for any in-place op (x must not be a leaf that requires grad).
        backend: "auto" | "reference" | "triton" | "cuda" (see README's backend table).
        conv_cudnn: where the call runs the reference, False turns cuDNN off around its conv
            (what the official DWCONV3D_DISABLE_CUDNN means; see reference()). Fused backends
            never use cuDNN.

    Variant switches (docs/design.md §9; defaults = the official module):
        norm: None | "layernorm", with norm_weight, norm_bias (C,) (or None) and norm_eps.
        act_after_fc1, act_after_conv: None | "gelu" | "quick_gelu" | "relu".
        prefix_mode: "skip" | "mlp" (prefix tokens through fc1 -> activations -> fc2, no conv).
        scale: a 0-dim tensor multiplying the branch (None: 1).
        drop_path: probability; with training=True one Bernoulli per clip zeroes the branch or
            scales it by 1/(1-p) (torch's RNG: a seeded run repeats). training=False: identity.
    The Triton backend fuses every switch: norm (folded into fc1's K loop; one more launch per
    pass, the parameter fold), the activations, scale, DropPath (one float32 Bernoulli draw per
    clip, the op's only extra saved tensor) and prefix_mode="mlp", for temporal kernels (kt, 1, 1)
    with kt <= 9 and spatial ones with kh, kw <= 7 (kernels/adapter_stencil.py). The CUDA backend
    fuses the official switches only. Beyond what a backend fuses, "auto" falls back to the
    reference with a one-time warning naming the case, and an explicit backend raises naming it.

    Under torch.autocast the parameters (and scale) are cast to the autocast dtype (their grads
    stay in their own dtype; the LayerNorm runs as autocast runs F.layer_norm) and the result
    keeps x's dtype, as the official module's in-place add does. Meta tensors give a meta result
    of x's shape.
    """
    c, ca, kernel_size = check_inputs(
        x, num_frames, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
        num_prefix_tokens, grid_size,
    )
    variant = check_variant_inputs(
        x, fc1_weight.dtype, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
        act_after_fc1=act_after_fc1, act_after_conv=act_after_conv, prefix_mode=prefix_mode,
        scale=scale, drop_path=drop_path, training=training,
    )
    params = [fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias]
    if _autocast_on(x.device.type):
        cast_to = torch.get_autocast_dtype(x.device.type)
        params = [p.to(cast_to) if p is not None else None for p in params]
        scale = scale.to(cast_to) if scale is not None else None
    compute_dtype = params[0].dtype
    name = resolve_backend(backend, x, kernel_size, compute_dtype, None if variant.official else variant)
    if name == "reference":
        return reference(x, num_frames, *params, num_prefix_tokens=num_prefix_tokens,
                         grid_size=grid_size, inplace=inplace, conv_cudnn=conv_cudnn,
                         norm=norm, norm_weight=norm_weight, norm_bias=norm_bias, norm_eps=norm_eps,
                         act_after_fc1=act_after_fc1, act_after_conv=act_after_conv,
                         prefix_mode=prefix_mode, scale=scale, drop_path=drop_path, training=training)
    if x.numel() == 0:
        return x if inplace else x.clone()
    p = variant.drop_path  # 0 unless training
    draw = drop_path_draw(x.shape[0] // num_frames, p, x.device) if p > 0 else None
    grid_h, grid_w = infer_grid(x.shape[1] - num_prefix_tokens, grid_size)
    switches = (scale, draw, p, act_after_fc1, act_after_conv, grid_h, grid_w, norm_weight, norm_bias,
                float(norm_eps), norm is not None, prefix_mode == "mlp")
    if not inplace:
        return fused_adapter(x, *params, num_frames, num_prefix_tokens, name, *switches)
    # In place: the op saves its input for backward, so under autograd it gets a copy of x
    # (x itself is overwritten below); without autograd x is read directly.
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, *params, scale, norm_weight, norm_bias)
    )
    out = fused_adapter(x.clone() if needs_grad else x, *params, num_frames, num_prefix_tokens, name, *switches)
    x.copy_(out)
    return x
