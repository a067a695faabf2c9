"""Reference ST-Adapter in plain PyTorch: the oracle every backend is tested against.

It mirrors the official ``Adapter.forward`` (linziyi96/st-adapter, models_adapter.py) step by
step -- fc1 on the spatial tokens, reshape to (B, Ca, T, H, W), depthwise Conv3d, reshape back,
fc2, residual add -- generalised to ``num_prefix_tokens`` prefix tokens, any odd kernel size
and an explicit non-square grid, plus the switches of the field's variants (docs/design.md §9:
LayerNorm before fc1, activations, prefix tokens through the MLP, a learnable scale, DropPath).
Keep it boring: no fusion, no tricks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .variants import ACTIVATIONS, Variant

__all__ = ["reference", "reference_layernorm", "infer_grid", "activation", "drop_path_mask"]


def infer_grid(num_spatial: int, grid_size: Optional[Sequence[int]] = None) -> Tuple[int, int]:
    """(H, W) of the spatial tokens: ``grid_size`` if given, else the square root (asserted)."""
    if grid_size is not None:
        if len(grid_size) != 2:
            raise ValueError(f"grid_size must be (H, W), got {tuple(grid_size)}")
        h, w = int(grid_size[0]), int(grid_size[1])
        if h <= 0 or w <= 0 or h * w != num_spatial:
            raise ValueError(
                f"grid_size {(h, w)} holds {h * w} tokens but the input has {num_spatial} spatial "
                f"tokens (L - num_prefix_tokens)"
            )
        return h, w
    side = math.isqrt(num_spatial)
    if side * side != num_spatial:
        raise ValueError(
            f"cannot infer a square grid from {num_spatial} spatial tokens (L - num_prefix_tokens);"
            f" pass grid_size=(H, W)"
        )
    return side, side


@contextlib.contextmanager
def _cudnn_disabled():
    """torch.backends.cudnn.enabled = False, then back: the official module's own toggle.
    (torch.backends.cudnn.flags() would also reset benchmark/deterministic to its defaults.)"""
    prior = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = False
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = prior


def activation(name: Optional[str], t: torch.Tensor) -> torch.Tensor:
    """docs/design.md §9's activations: None (identity), "gelu" (erf), "quick_gelu", "relu"."""
    if name is None:
        return t
    if name == "gelu":
        return F.gelu(t)
    if name == "quick_gelu":
        return t * torch.sigmoid(1.702 * t)
    if name == "relu":
        return F.relu(t)
    raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")


def drop_path_mask(num_clips: int, p: float, like: torch.Tensor) -> torch.Tensor:
    """(num_clips, 1, 1, 1) DropPath factors: 0 with probability p, else 1/(1-p); one Bernoulli
    per clip from torch's RNG on ``like``'s device. Drawn in float32 whatever ``like``'s dtype,
    so one seed gives one mask in every dtype (CPU draws agree across dtypes anyway; this makes
    it hold on every device); the 0/1 draws are cast to ``like``'s dtype, then divided by 1-p in
    it, as timm's drop_path (which MMAction2 uses) divides its mask."""
    keep = 1.0 - p
    mask = torch.empty((num_clips, 1, 1, 1), dtype=torch.float32, device=like.device).bernoulli_(keep)
    return mask.to(like.dtype).div_(keep)


def reference(
    x: torch.Tensor,
    num_frames: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    *,
    num_prefix_tokens: int = 1,
    grid_size: Optional[Sequence[int]] = None,
    inplace: bool = False,
    conv_cudnn: bool = True,
    norm: Optional[str] = None,
    norm_weight: Optional[torch.Tensor] = None,
    norm_bias: Optional[torch.Tensor] = None,
    norm_eps: float = 1e-5,
    act_after_fc1: Optional[str] = None,
    act_after_conv: Optional[str] = None,
    prefix_mode: str = "skip",
    scale: Optional[torch.Tensor] = None,
    drop_path: float = 0.0,
    training: bool = False,
    backend: str = "reference",
    **unused,
) -> torch.Tensor:
    """ST-Adapter forward in eager PyTorch, official module and docs/design.md §9 variants.

    Args:
        x: (B*T, L, C), frames of one clip contiguous (row b*T + t).
        num_frames: T.
        fc1_weight: (Ca, C), fc1_bias: (Ca,)
        conv_weight: (Ca, 1, kt, kh, kw) depthwise, conv_bias: (Ca,)
        fc2_weight: (C, Ca), fc2_bias: (C,)
        num_prefix_tokens: P tokens at the start of each frame (CLS, registers).
        grid_size: (H, W) with H*W = L - P; inferred as a square when None.
        inplace: add into x in place and return x, as the official module does.
        conv_cudnn: False turns cuDNN off around the depthwise conv's forward (its backward runs
            under the global flag), which is what the official config DWCONV3D_DISABLE_CUDNN
            means to do: cuDNN's depthwise 3D conv is slower than PyTorch's native kernel (shape
            A forward 0.69 ms with cuDNN, 0.53 ms without). The official module as shipped
            leaves cuDNN on, as the default True does. CPU tensors never use cuDNN.
        norm: None | "layernorm": z = LayerNorm(x) over C (norm_weight, norm_bias: (C,) or None,
            norm_eps) feeds fc1; the residual adds to x itself.
        act_after_fc1, act_after_conv: None | "gelu" | "quick_gelu" | "relu".
        prefix_mode: "skip": prefix tokens pass through unchanged. "mlp": they go through
            fc1 -> act_after_fc1 -> act_after_conv -> fc2 too (no conv, no conv bias).
        scale: 0-dim tensor s; the branch is multiplied by s. None: s = 1.
        drop_path: p; with training=True, per clip, the branch is zeroed with probability p and
            scaled by 1/(1-p) otherwise (drop_path_mask). Identity when training is False.

    Returns:
        (B*T, L, C): x + s * DropPath(fc2(act_conv(conv(act_fc1(fc1(z)))))) on the adapted rows
        (the spatial tokens; every token with prefix_mode="mlp").
    """
    del backend, unused  # same signature as st_adapter(); the reference has one backend
    Variant(norm, act_after_fc1, act_after_conv, prefix_mode, scale is not None, drop_path)  # names a bad switch
    bt, seq_len, channels = x.shape
    p = num_prefix_tokens
    t = num_frames
    h_grid, w_grid = infer_grid(seq_len - p, grid_size)
    ca = fc1_weight.shape[0]
    kernel = tuple(conv_weight.shape[2:])
    through_mlp = prefix_mode == "mlp"
    first = 0 if through_mlp else p  # first adapted row of each frame

    if bt == 0 or seq_len - first == 0:  # nothing to adapt
        return x if inplace else x.clone()
    x_id = x
    xs = x[:, first:, :]
    if norm == "layernorm":
        xs = F.layer_norm(xs, (channels,), norm_weight, norm_bias, norm_eps)
    xs = F.linear(xs, fc1_weight, fc1_bias)  # (B*T, S or L, Ca)
    xs = activation(act_after_fc1, xs)
    prefix_rows, xs = xs[:, : p - first, :], xs[:, p - first :, :]  # prefix rows empty unless "mlp"
    if h_grid * w_grid > 0:  # conv3d rejects empty grids
        # (B*T, S, Ca) -> (B, Ca, T, H, W), contiguous as the official view + permute + contiguous
        xs = rearrange(xs, "(b t) (h w) c -> b c t h w", t=t, h=h_grid).contiguous()
        with contextlib.nullcontext() if conv_cudnn else _cudnn_disabled():
            xs = F.conv3d(
                xs,
                conv_weight,
                conv_bias,
                stride=1,
                padding=tuple(k // 2 for k in kernel),
                groups=ca,
            )
        xs = rearrange(xs, "b c t h w -> (b t) (h w) c").contiguous()  # (B*T, S, Ca), as the official code
    if through_mlp:
        xs = torch.cat([prefix_rows, xs], dim=1)  # (B*T, L, Ca): prefix rows skip the conv
    xs = activation(act_after_conv, xs)
    xs = F.linear(xs, fc2_weight, fc2_bias)  # (B*T, S or L, C)
    if training and drop_path > 0:
        keep = drop_path_mask(bt // t, drop_path, xs)  # (B, 1, 1, 1): one draw per clip
        xs = rearrange(rearrange(xs, "(b t) l c -> b t l c", t=t) * keep, "b t l c -> (b t) l c")
    if scale is not None:
        xs = scale * xs
    if inplace:
        x_id[:, first:, :] += xs
        return x_id
    out = x_id.clone()
    out[:, first:, :] += xs
    return out


def reference_layernorm(
    x: torch.Tensor,
    num_frames: int,
    fc1_weight: torch.Tensor,
    fc1_bias: Optional[torch.Tensor],
    conv_weight: torch.Tensor,
    conv_bias: Optional[torch.Tensor],
    fc2_weight: torch.Tensor,
    fc2_bias: Optional[torch.Tensor],
    norm_weight: Optional[torch.Tensor],
    norm_bias: Optional[torch.Tensor],
    *,
    norm_eps: float = 1e-5,
    normed_dtype: Optional[torch.dtype] = None,
    num_prefix_tokens: int = 1,
    grid_size: Optional[Sequence[int]] = None,
    conv_cudnn: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The adapter + LayerNorm pair as a model runs it (st_adapter_fast.adapter_layernorm's
    oracle, same signature): out = reference(x, ...), normed = layer_norm(out) computed in fp32
    (float64 stays float64) and returned in normed_dtype (None: out's dtype)."""
    out = reference(x, num_frames, fc1_weight, fc1_bias, conv_weight, conv_bias, fc2_weight, fc2_bias,
                    num_prefix_tokens=num_prefix_tokens, grid_size=grid_size, conv_cudnn=conv_cudnn)
    compute = torch.promote_types(out.dtype, torch.float32)
    with torch.autocast(out.device.type, enabled=False) if torch.amp.is_autocast_available(out.device.type) \
            else contextlib.nullcontext():
        normed = F.layer_norm(out.to(compute), (out.shape[-1],),
                              norm_weight.to(compute) if norm_weight is not None else None,
                              norm_bias.to(compute) if norm_bias is not None else None, norm_eps)
    return out, normed.to(normed_dtype or out.dtype)
