"""Reference ST-Adapter in plain PyTorch: the oracle every backend is tested against.

It mirrors the official ``Adapter.forward`` (linziyi96/st-adapter, models_adapter.py) step by
step -- fc1 on the spatial tokens, reshape to (B, Ca, T, H, W), depthwise Conv3d, reshape back,
fc2, residual add -- generalised to ``num_prefix_tokens`` prefix tokens, any odd kernel size
and an explicit non-square grid. Keep it boring: no fusion, no tricks.
"""

from __future__ import annotations

import contextlib
import math
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange

__all__ = ["reference", "infer_grid"]


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
    backend: str = "reference",
    **unused,
) -> torch.Tensor:
    """ST-Adapter forward in eager PyTorch.

    Args:
        x: (B*T, L, C), frames of one clip contiguous (row b*T + t).
        num_frames: T.
        fc1_weight: (Ca, C), fc1_bias: (Ca,)
        conv_weight: (Ca, 1, kt, kh, kw) depthwise, conv_bias: (Ca,)
        fc2_weight: (C, Ca), fc2_bias: (C,)
        num_prefix_tokens: P tokens at the start of each frame that pass through unchanged.
        grid_size: (H, W) with H*W = L - P; inferred as a square when None.
        inplace: add into x[:, P:] in place and return x, as the official module does.
        conv_cudnn: False turns cuDNN off around the depthwise conv's forward (its backward runs
            under the global flag), which is what the official config DWCONV3D_DISABLE_CUDNN
            means to do: cuDNN's depthwise 3D conv is slower than PyTorch's native kernel (shape
            A forward 0.69 ms with cuDNN, 0.53 ms without). The official module as shipped
            leaves cuDNN on, as the default True does. CPU tensors never use cuDNN.

    Returns:
        (B*T, L, C): x with ``fc2(conv(fc1(x[:, P:])))`` added to the spatial tokens.
    """
    del backend, unused  # same signature as st_adapter(); the reference has one backend
    bt, seq_len, channels = x.shape
    p = num_prefix_tokens
    t = num_frames
    h_grid, w_grid = infer_grid(seq_len - p, grid_size)
    ca = fc1_weight.shape[0]
    kernel = tuple(conv_weight.shape[2:])

    if bt == 0 or h_grid * w_grid == 0:  # nothing to adapt (conv3d rejects empty grids)
        return x if inplace else x.clone()
    x_id = x
    xs = x[:, p:, :]
    xs = F.linear(xs, fc1_weight, fc1_bias)  # (B*T, S, Ca)
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
    xs = F.linear(xs, fc2_weight, fc2_bias)  # (B*T, S, C)
    if inplace:
        x_id[:, p:, :] += xs
        return x_id
    out = x_id.clone()
    out[:, p:, :] += xs
    return out
