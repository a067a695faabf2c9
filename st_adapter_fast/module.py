"""nn.Module wrapper: STAdapter, state-dict compatible with the official ST-Adapter ``Adapter``."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .ops import BACKEND_NAMES, st_adapter
from .variants import Variant, check_drop_path

__all__ = ["STAdapter"]


def _triple(k: Union[int, Sequence[int]]) -> Tuple[int, int, int]:
    if isinstance(k, int):
        return (k, 1, 1)
    k = tuple(int(v) for v in k)
    if len(k) != 3:
        raise ValueError(f"kernel_size must be an int kt or (kt, kh, kw), got {k}")
    return k


class STAdapter(nn.Module):
    """fc1 (C -> Ca) -> depthwise Conv3d over (T, H, W) -> fc2 (Ca -> C), added to the spatial
    tokens of x; prefix tokens pass through.

    Parameters match the official ``Adapter`` (fc1, conv, fc2; conv weight, all biases zero at
    init, so a fresh adapter is the identity). ``forward(x, num_frames)``: x (B*T, L, C) ->
    (B*T, L, C), a new tensor unless ``inplace``. ``conv_cudnn=False``: where the reference
    runs, cuDNN is off around its conv, as the official DWCONV3D_DISABLE_CUDNN means (see
    st_adapter_fast.reference); an attribute, so it can be switched on a built model.

    Variant switches (docs/design.md §9; the defaults are the official module, bit for bit):
    ``norm="layernorm"`` adds child ``norm`` (nn.LayerNorm(C), eps 1e-5) before fc1;
    ``act_after_fc1`` / ``act_after_conv`` in None, "gelu", "quick_gelu", "relu";
    ``prefix_mode="mlp"`` sends prefix tokens through fc1 -> activations -> fc2 (no conv);
    ``scale=s0`` adds a 0-dim Parameter ``scale`` (initialised to s0) multiplying the branch;
    ``drop_path=p`` drops the branch per clip with probability p in training mode (identity in
    eval). MMAction2's STAdapter is ``STAdapter(C, Ca, (3, 3, 3), act_after_conv="relu",
    prefix_mode="mlp", scale=0.0, drop_path=0.1)`` (models.checkpoint.load_mmaction_checkpoint
    maps its keys). The Triton backend fuses every switch: norm, the activations, scale, DropPath
    and prefix_mode="mlp", with temporal kernels (kt, 1, 1), kt <= 9, and spatial ones up to
    kh, kw = 7; beyond those backend="auto" falls back to the reference with a one-time warning
    naming the case (README's backend table).
    """

    def __init__(
        self,
        in_channels: int,
        adapter_channels: int,
        kernel_size: Union[int, Sequence[int]] = (3, 1, 1),
        num_prefix_tokens: int = 1,
        backend: str = "auto",
        *,
        grid_size: Optional[Sequence[int]] = None,
        inplace: bool = False,
        conv_cudnn: bool = True,
        norm: Optional[str] = None,
        act_after_fc1: Optional[str] = None,
        act_after_conv: Optional[str] = None,
        prefix_mode: str = "skip",
        scale: Optional[float] = None,
        drop_path: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        kernel_size = _triple(kernel_size)
        if any(k < 1 or k % 2 == 0 for k in kernel_size):
            raise ValueError(f"kernel_size must be odd and positive in every dim, got {kernel_size}")
        if backend not in BACKEND_NAMES:
            from .backends import available_backends

            if backend not in available_backends():
                raise ValueError(f"unknown backend {backend!r}; expected one of {BACKEND_NAMES}")
        # validates every switch by name (ValueError naming the choices)
        Variant(norm=norm, act_after_fc1=act_after_fc1, act_after_conv=act_after_conv,
                prefix_mode=prefix_mode, drop_path=check_drop_path(drop_path))
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
            raise TypeError(f"scale must be None or the float its Parameter starts at, got {scale!r}")
        factory = dict(device=device, dtype=dtype)
        self.fc1 = nn.Linear(in_channels, adapter_channels, **factory)
        self.conv = nn.Conv3d(
            adapter_channels, adapter_channels, kernel_size=kernel_size, stride=1,
            padding=tuple(k // 2 for k in kernel_size), groups=adapter_channels, **factory,
        )
        self.fc2 = nn.Linear(adapter_channels, in_channels, **factory)
        self.norm = nn.LayerNorm(in_channels, eps=1e-5, **factory) if norm == "layernorm" else None
        if scale is None:
            self.register_parameter("scale", None)
        else:
            self.scale = nn.Parameter(torch.full((), float(scale), **factory))
        self.act_after_fc1 = act_after_fc1
        self.act_after_conv = act_after_conv
        self.prefix_mode = prefix_mode
        self.drop_path = float(drop_path)
        self.num_prefix_tokens = num_prefix_tokens
        self.grid_size = tuple(grid_size) if grid_size is not None else None
        self.inplace = inplace
        self.conv_cudnn = conv_cudnn
        self.backend = backend
        nn.init.constant_(self.conv.weight, 0.0)
        nn.init.constant_(self.conv.bias, 0.0)
        nn.init.constant_(self.fc1.bias, 0.0)
        nn.init.constant_(self.fc2.bias, 0.0)

    @property
    def kernel_size(self) -> Tuple[int, int, int]:
        return tuple(self.conv.kernel_size)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        return st_adapter(
            x, num_frames,
            self.fc1.weight, self.fc1.bias, self.conv.weight, self.conv.bias,
            self.fc2.weight, self.fc2.bias,
            num_prefix_tokens=self.num_prefix_tokens, grid_size=self.grid_size,
            inplace=self.inplace, backend=self.backend, conv_cudnn=self.conv_cudnn,
            norm="layernorm" if self.norm is not None else None,
            norm_weight=self.norm.weight if self.norm is not None else None,
            norm_bias=self.norm.bias if self.norm is not None else None,
            norm_eps=self.norm.eps if self.norm is not None else 1e-5,
            act_after_fc1=self.act_after_fc1, act_after_conv=self.act_after_conv,
            prefix_mode=self.prefix_mode, scale=self.scale, drop_path=self.drop_path,
            training=self.training,
        )

    # inject_st_adapters(..., fuse_layernorm=True) sets it: the adapted block forwards then call
    # forward_layernorm with the block's LayerNorm instead of forward followed by that LayerNorm
    fuse_layernorm: bool = False

    def forward_layernorm(self, x: torch.Tensor, num_frames: int, norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
        """(out, norm(out)) with out = self(x, num_frames), as one fused op (the adapter + LayerNorm
        pair, st_adapter_fast.adapter_layernorm): backward saves x and per-token statistics, not
        out or the LayerNorm's fp32 copy of it (docs/design.md §7). ``norm`` is the block's
        LayerNorm; normed comes back in the dtype that module returns (models.families.base
        .layernorm_rule). The official switches only: a variant adapter, or inplace=True, runs
        the two modules one after the other."""
        from .adapter_layernorm import st_adapter_layernorm
        from .models.families.base import layernorm_rule

        rule = layernorm_rule(norm, self.fc1.in_features)
        if not self.variant.official or self.inplace:
            out = self(x, num_frames)
            return out, norm(out)
        return st_adapter_layernorm(
            x, num_frames, self.fc1.weight, self.fc1.bias, self.conv.weight, self.conv.bias,
            self.fc2.weight, self.fc2.bias, norm.weight, norm.bias, norm_eps=norm.eps,
            normed_dtype=x.dtype if rule == "input" else None, num_prefix_tokens=self.num_prefix_tokens,
            grid_size=self.grid_size, backend=self.backend, conv_cudnn=self.conv_cudnn,
        )

    @property
    def variant(self) -> Variant:
        """This adapter's docs/design.md §9 switches (drop_path as in effect in this mode)."""
        return Variant(norm="layernorm" if self.norm is not None else None,
                       act_after_fc1=self.act_after_fc1, act_after_conv=self.act_after_conv,
                       prefix_mode=self.prefix_mode, scale=self.scale is not None,
                       drop_path=self.drop_path if self.training else 0.0)

    def extra_repr(self) -> str:
        switches = [f"{k}={getattr(self, k)!r}" for k in ("act_after_fc1", "act_after_conv") if getattr(self, k)]
        if self.prefix_mode != "skip":
            switches.append(f"prefix_mode={self.prefix_mode!r}")
        if self.drop_path:
            switches.append(f"drop_path={self.drop_path:g}")
        return (f"num_prefix_tokens={self.num_prefix_tokens}, kernel_size={self.kernel_size}, "
                f"backend={self.backend!r}, inplace={self.inplace}"
                + ("" if self.conv_cudnn else ", conv_cudnn=False")
                + "".join(", " + s for s in switches))
