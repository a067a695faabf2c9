"""A CLIP-style ViT laid out like the official ST-Adapter model, which loads OpenAI CLIP weights.

The module tree and parameter names are OpenAI CLIP's ``VisionTransformer`` (conv1,
class_embedding, positional_embedding, ln_pre, transformer.resblocks[i].{ln_1, attn, ln_2,
mlp.{c_fc, gelu, c_proj}}, ln_post, proj), so ``visual.*`` weights from a CLIP checkpoint load
as they are. As in the official ST-Adapter model (linziyi96/st-adapter, models_adapter.py):
tokens are batch-first (B*T, L, C) (OpenAI's model runs (L, N, C); the weights do not care),
attention is scaled_dot_product_attention on nn.MultiheadAttention's parameters, and each block
has optional ``adapter_pre_attn`` / ``adapter_pre_mlp`` slots, empty until
:func:`st_adapter_fast.models.inject.inject_st_adapters` fills them.

Nothing here downloads anything: weights come from a file the user already has
(:func:`load_openai_clip_visual`).

    model = clip_vit_base_patch16_adapter12x384(num_classes=400, weights="ViT-B-16.pt")
    logits = model(clips)  # (B, 3, T, 224, 224) -> (B, 400)
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from .inject import adapter_num_frames

__all__ = [
    "CLIPVisionConfig", "CLIP_CONFIGS", "CLIPVisionTransformer", "ResidualAttentionBlock",
    "clip_config_from_state_dict", "load_openai_clip_visual", "LoadReport",
    "build_clip_video_model", "clip_vit_base_patch16_adapter12x384",
    "clip_vit_base_patch16_adapter24x384", "clip_vit_large_patch14_adapter24x384",
]


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    input_resolution: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    output_dim: Optional[int] = 512  # proj: (width, output_dim); None = no projection


CLIP_CONFIGS: Dict[str, CLIPVisionConfig] = {
    "ViT-B/32": CLIPVisionConfig(224, 32, 768, 12, 12, 512),
    "ViT-B/16": CLIPVisionConfig(224, 16, 768, 12, 12, 512),
    "ViT-L/14": CLIPVisionConfig(224, 14, 1024, 24, 16, 768),
    "ViT-L/14@336px": CLIPVisionConfig(336, 14, 1024, 24, 16, 768),
}


class LayerNorm(nn.LayerNorm):
    """CLIP's LayerNorm: statistics in fp32 whatever the input dtype (a frozen fp16 backbone)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays
        weight = self.weight.to(compute) if self.weight is not None else None
        bias = self.bias.to(compute) if self.bias is not None else None
        out = F.layer_norm(x.to(compute), self.normalized_shape, weight, bias, self.eps)
        return out.to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """x -> [adapter_pre_attn] -> x + attn(ln_1(x)) -> [adapter_pre_mlp] -> x + mlp(ln_2(x)).

    x: (B*T, L, C), batch first. The adapter slots are None until injection fills them.
    """

    # inject_st_adapters fills adapter_pre_attn / adapter_pre_mlp; forward already calls them
    supports_st_adapters = True

    def __init__(self, d_model: int, n_head: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head)
        self.ln_1 = LayerNorm(d_model)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(d_model, d_model * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(d_model * 4, d_model)),
        ]))
        self.ln_2 = LayerNorm(d_model)
        self.adapter_pre_attn: Optional[nn.Module] = None
        self.adapter_pre_mlp: Optional[nn.Module] = None

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """Multi-head self-attention on nn.MultiheadAttention's weights. x: (N, L, C)."""
        n, seq_len, _ = x.shape
        heads = self.attn.num_heads
        qkv = F.linear(x, self.attn.in_proj_weight, self.attn.in_proj_bias)
        # in_proj rows are [q; k; v], so viewing (N, L, 3*heads, d) puts q's heads first
        qkv = qkv.view(n, seq_len, 3 * heads, -1).permute(0, 2, 1, 3)
        q, k, v = qkv.split([heads, heads, heads], dim=1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.permute(0, 2, 1, 3).flatten(-2)
        return self.attn.out_proj(out)

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        x, normed = self._adapted(self.adapter_pre_attn, self.ln_1, x, num_frames)
        x = x + self.attention(normed)
        x, normed = self._adapted(self.adapter_pre_mlp, self.ln_2, x, num_frames)
        x = x + self.mlp(normed)
        return x

    def _adapted(self, adapter: Optional[nn.Module], norm: nn.Module, x: torch.Tensor,
                 num_frames: Optional[int]) -> tuple:
        """(adapter(x), norm(adapter(x))); one fused op after inject_st_adapters(...,
        fuse_layernorm=True) (STAdapter.forward_layernorm)."""
        if adapter is None:
            return x, norm(x)
        t = adapter_num_frames(adapter, num_frames)
        if getattr(adapter, "fuse_layernorm", False):
            return adapter.forward_layernorm(x, t, norm)
        x = adapter(x, t)
        return x, norm(x)


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.width = width
        self.layers = layers
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads) for _ in range(layers)])

    def forward(self, x: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x, num_frames)
        return x


class CLIPVisionTransformer(nn.Module):
    """OpenAI CLIP's image tower, batch first, with adapter slots in every block.

    ``forward(images)``: (N, 3, H, W) -> (N, output_dim) (CLS after ln_post, times proj), CLIP's
    image embedding. ``forward_tokens(images)``: (N, L, C) tokens before ln_post, what the video
    classifier pools. With adapters, N = B*T frames (clip-major) and num_frames comes from
    ``set_num_frames`` / the video wrapper, or the ``num_frames`` argument.
    """

    def __init__(self, config: CLIPVisionConfig = CLIPVisionConfig()):
        super().__init__()
        self.config = config
        width = config.width
        self.input_resolution = config.input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        scale = width ** -0.5
        grid = config.input_resolution // config.patch_size
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, config.layers, config.heads)
        self.ln_post = LayerNorm(width)
        self.proj = (nn.Parameter(scale * torch.randn(width, config.output_dim))
                     if config.output_dim is not None else None)

    @property
    def width(self) -> int:
        return self.config.width

    num_prefix_tokens = 1  # the CLS token

    def forward_tokens(self, images: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        """images (N, 3, H, W) -> tokens (N, 1 + H/p * W/p, C) after the last block."""
        if images.dim() != 4:
            raise ValueError(f"images must have shape (N, 3, H, W), got {tuple(images.shape)}")
        x = self.conv1(images.to(self.conv1.weight.dtype))  # (N, C, gh, gw)
        x = x.flatten(2).transpose(1, 2)  # (N, gh*gw, C)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        if x.shape[1] != self.positional_embedding.shape[0]:
            raise ValueError(
                f"images of {tuple(images.shape[-2:])} give {x.shape[1]} tokens but the positional "
                f"embedding holds {self.positional_embedding.shape[0]} "
                f"(input_resolution={self.input_resolution}, patch_size={self.config.patch_size})"
            )
        x = x + self.positional_embedding.to(x.dtype)
        x = self.ln_pre(x)
        return self.transformer(x, num_frames)

    def forward(self, images: torch.Tensor, num_frames: Optional[int] = None) -> torch.Tensor:
        x = self.ln_post(self.forward_tokens(images, num_frames)[:, 0, :])
        if self.proj is not None:
            x = x @ self.proj.to(x.dtype)
        return x


# ------------------------------------------------------------------------------ weight loading
@dataclasses.dataclass
class LoadReport:
    """What load_state_dict did: keys of the model not filled, keys of the file not used."""

    missing_keys: List[str]
    unexpected_keys: List[str]

    def __str__(self) -> str:
        def short(keys):
            return ", ".join(keys[:6]) + (f", ... ({len(keys)} in all)" if len(keys) > 6 else "")

        return (f"missing {len(self.missing_keys)} keys [{short(self.missing_keys)}]; "
                f"unexpected {len(self.unexpected_keys)} keys [{short(self.unexpected_keys)}]")


_VISUAL_PREFIXES = ("module.", "visual.")


def _read_clip_state_dict(source: Union[str, os.PathLike, Mapping[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    """A CLIP state dict, from a dict or a local file: torch.save'd dicts load with
    weights_only=True; OpenAI's released .pt files are TorchScript archives (torch.jit.load)."""
    if isinstance(source, Mapping):
        state = dict(source)
    else:
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no CLIP weights file at {path!r} (nothing is downloaded; pass a local file)")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as load_error:  # OpenAI's files are TorchScript, not pickles
            try:
                state = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception:
                raise ValueError(f"{path!r} is neither a torch.save'd state dict nor a TorchScript "
                                 f"CLIP archive ({load_error})") from None
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = state["state_dict"]  # open_clip training checkpoints
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    return dict(state)


def _visual_only(state: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Strip 'module.' and keep the image tower: 'visual.*' of a full CLIP state dict, or all of
    an image-tower state dict."""
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    return dict(state)


def clip_config_from_state_dict(state: Mapping[str, torch.Tensor], *, heads: Optional[int] = None) -> CLIPVisionConfig:
    """Read the architecture off the weights, as OpenAI's ``build_model`` does. The head count
    is not in the weights: OpenAI's models all use width / 64 (the default here)."""
    state = _visual_only(state)
    for key in ("conv1.weight", "positional_embedding"):
        if key not in state:
            raise ValueError(f"not a CLIP ViT image tower: no {key!r} among {sorted(state)[:8]}...")
    width, _, patch, _ = state["conv1.weight"].shape
    layers = len({m.group(1) for k in state if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))})
    grid = round((state["positional_embedding"].shape[0] - 1) ** 0.5)
    proj = state.get("proj")
    return CLIPVisionConfig(
        input_resolution=patch * grid, patch_size=patch, width=width, layers=layers,
        heads=heads if heads is not None else max(width // 64, 1),
        output_dim=None if proj is None else proj.shape[1],
    )


def load_openai_clip_visual(
    model: nn.Module,
    source: Union[str, os.PathLike, Mapping[str, torch.Tensor]],
    *,
    strict: bool = True,
) -> LoadReport:
    """Load OpenAI (or open_clip) CLIP image-tower weights into a CLIPVisionTransformer.

    Args:
        model: a CLIPVisionTransformer, or a VideoClassifier around one.
        source: a local file (OpenAI's TorchScript .pt, or a torch.save'd state dict with
            'visual.*' keys or bare image-tower keys) or an in-memory state dict.
        strict: raise if a backbone weight is missing, the file has keys the model lacks, or a
            shape differs. Adapter and head parameters are never expected in a CLIP file.

    Weights are copied into the model's parameters (cast to their dtype); returns a LoadReport.
    """
    backbone = getattr(model, "backbone", model)
    if not isinstance(backbone, CLIPVisionTransformer):
        raise TypeError(f"expected a CLIPVisionTransformer (or a VideoClassifier around one), got {type(backbone).__name__}")
    state = _visual_only(_read_clip_state_dict(source))
    own = backbone.state_dict()
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise ValueError("CLIP weights do not fit this model (wrong config?):\n  " + "\n  ".join(mismatched[:8]))
    result = backbone.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if ".adapter_pre_" not in k]
    report = LoadReport(missing_keys=missing, unexpected_keys=list(result.unexpected_keys))
    if strict and (report.missing_keys or report.unexpected_keys):
        raise ValueError(f"CLIP weights do not match the model: {report}")
    return report


# ---------------------------------------------------------------------------- official models
def build_clip_video_model(
    arch: Union[str, CLIPVisionConfig] = "ViT-B/16",
    num_classes: int = 400,
    *,
    weights: Union[None, str, os.PathLike, Mapping[str, torch.Tensor]] = None,
    adapter_channels: Union[int, float] = 384,
    kernel_size: Sequence[int] = (3, 1, 1),
    positions: Sequence[str] = ("pre_mlp",),
    last_n_blocks: Optional[int] = None,
    dropout: float = 0.5,
    backend: str = "auto",
    verbose: bool = False,
):
    """CLIP ViT + ST-Adapters + frame-averaged head: the official ST-Adapter video model.

    Returns a VideoClassifier: clips (B, 3, T, H, W) -> logits (B, num_classes). The backbone is
    frozen (fp32 here; see st_adapter_fast.models.mixed_precision for the official fp16 recipe).
    """
    from .inject import inject_st_adapters
    from .video import VideoClassifier

    if isinstance(arch, str) and arch not in CLIP_CONFIGS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(CLIP_CONFIGS)} or a CLIPVisionConfig")
    config = CLIP_CONFIGS[arch] if isinstance(arch, str) else arch
    backbone = CLIPVisionTransformer(config)
    if weights is not None:
        load_openai_clip_visual(backbone, weights)
    inject_st_adapters(
        backbone, adapter_channels=adapter_channels, kernel_size=kernel_size, positions=positions,
        last_n_blocks=last_n_blocks, backend=backend, verbose=verbose,
    )
    return VideoClassifier(backbone, num_classes, dropout=dropout)


def clip_vit_base_patch16_adapter12x384(num_classes: int = 400, **kwargs):
    """ViT-B/16, one 384-wide adapter before the MLP of each of the 12 blocks (Kinetics-400)."""
    return build_clip_video_model("ViT-B/16", num_classes, adapter_channels=384, positions=("pre_mlp",), **kwargs)


def clip_vit_base_patch16_adapter24x384(num_classes: int = 174, **kwargs):
    """ViT-B/16, 384-wide adapters before attention and before the MLP of all 12 blocks (SSv2)."""
    return build_clip_video_model("ViT-B/16", num_classes, adapter_channels=384,
                                  positions=("pre_attn", "pre_mlp"), **kwargs)


def clip_vit_large_patch14_adapter24x384(num_classes: int = 400, **kwargs):
    """ViT-L/14, one 384-wide adapter before the MLP of each of the 24 blocks."""
    return build_clip_video_model("ViT-L/14", num_classes, adapter_channels=384, positions=("pre_mlp",), **kwargs)
