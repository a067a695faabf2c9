"""Video classifier around an image ViT: clips (B, C, T, H, W) -> logits (B, num_classes).

As the official ST-Adapter model does: the B*T frames go through the backbone as one batch of
images (clip-major, row b*T + t, the layout the adapters expect), a per-frame feature is averaged
over frames, and a linear head ``fc`` (dropout before it) gives the logits. num_frames is set on
every ST-Adapter in the backbone on each call, so T may change between calls.

Clip features per backbone family (models/families/, each family's ``pool``):
  * st_adapter_fast CLIPVisionTransformer and OpenAI clip: exactly the official model -- CLS
    tokens of the last block averaged over frames, then ln_post (no CLIP projection). Official
    checkpoints give the official logits.
  * timm VisionTransformer / Eva: ``forward_head(forward_features(x), pre_logits=True)`` per
    frame (CLS after the final norm, or whatever pooling the model is configured with).
  * HF transformers CLIP / SigLIP / DINOv2: the model's pooler_output (CLS after the final norm;
    SigLIP's attention-pooling head), or the token mean where there is no pooler.
  * open_clip, and anything else: ``backbone(frames)`` must return (B*T, D) per-frame embeddings;
    pass ``feature_dim`` unless it can be read off the model (open_clip: ``output_dim``).
The per-frame features are averaged over frames in every case but the official one (which
averages the CLS tokens before ln_post, as the official code does).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .families.open_clip import embedding_pool
from .families.timm import timm_pool
from .inject import count_parameters, describe_model, find_vision_transformer, iter_st_adapters, set_num_frames

__all__ = ["VideoClassifier"]


def _pooling(backbone: nn.Module) -> Tuple[str, str, object, Optional[int]]:
    """(family, path of the tower in backbone, pool function, feature width or None)."""
    try:
        target = describe_model(backbone)
    except (TypeError, ValueError):  # no supported blocks: pool by what the model offers
        target = None
    if target is not None and target.pool is not None:
        _, prefix = find_vision_transformer(backbone)
        return target.family, prefix.rstrip("."), target.pool, target.feature_dim
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):
        dim = getattr(backbone, "num_features", getattr(backbone, "embed_dim", None))
        return "timm", "", timm_pool, int(dim) if dim else None
    dim = getattr(backbone, "output_dim", None)
    return "embedding", "", embedding_pool, int(dim) if dim is not None else None


def _check_layout(clips) -> None:
    if not isinstance(clips, torch.Tensor) or clips.dim() != 5:
        shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
        raise ValueError(f"clips must have shape (B, C, T, H, W), got {shape}")
    if clips.shape[1] not in (1, 3) and clips.shape[2] in (1, 3):
        raise ValueError(
            f"clips of shape {tuple(clips.shape)} look like (B, T, C, H, W) (HF VideoMAE's layout: "
            f"{clips.shape[2]} channels in dim 2); VideoClassifier takes (B, C, T, H, W): pass "
            f"clips.permute(0, 2, 1, 3, 4)")


class VideoClassifier(nn.Module):
    """clips (B, C, T, H, W) -> logits (B, num_classes): per-frame backbone, mean over frames, fc.

    Args:
        backbone: an image ViT, usually with ST-Adapters injected (inject_st_adapters).
        num_classes: head outputs.
        feature_dim: width of the pooled per-frame features; read off the backbone when None.
        dropout: before the head (the official models use 0.5).
        verbose: print the trainable parameter count of the whole model, head included; None
            (default) prints when the backbone's inject_st_adapters call printed its report.
    The head is ``fc`` (the official checkpoint's name), initialised as the official one:
    weight ~ N(0, 0.02), bias 0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, feature_dim: Optional[int] = None,
                 dropout: float = 0.5, verbose: Optional[bool] = None):
        super().__init__()
        self.backbone = backbone
        self.family, self._tower_path, self._pool, read_dim = _pooling(backbone)
        dim = feature_dim if feature_dim is not None else read_dim
        if dim is None:
            raise ValueError(f"cannot read the feature width off a {type(backbone).__name__}: pass feature_dim")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ref = next(backbone.parameters(), None)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes, device=ref.device if ref is not None else None)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.constant_(self.fc.bias, 0.0)
        if verbose is None:
            tower, _ = find_vision_transformer(backbone)
            report = getattr(tower, "st_adapter_report", None)
            verbose = bool(report is not None and report.printed)
        if verbose:
            print(self.trainable_summary())

    def trainable_summary(self) -> str:
        """The trainable parameter count of the whole model: adapters, head and whatever else trains."""
        trainable, total = count_parameters(self)
        adapters = sum(p.numel() for _, a in iter_st_adapters(self.backbone) for p in a.parameters())
        head = sum(p.numel() for p in self.fc.parameters())
        return (f"VideoClassifier ({self.family}, head {self.fc.in_features}->{self.fc.out_features}): trainable "
                f"params: {trainable:,} / {total:,} ({100.0 * trainable / max(total, 1):.2f}%), adapters "
                f"{adapters:,}, head {head:,}")

    def clip_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (B, C, T, H, W) -> frame-averaged features (B, D), before dropout and fc."""
        _check_layout(clips)
        b, _, t = clips.shape[:3]
        set_num_frames(self.backbone, t)
        frames = clips.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W), row b*T + t
        tower = self.backbone.get_submodule(self._tower_path)
        feats = self._pool(tower, frames, b, t)
        if feats.dim() != 2 or feats.shape[0] != b:
            raise ValueError(f"the backbone must give (B*T, D) = ({b * t}, D) frame features, got "
                             f"{tuple(feats.shape)} after averaging over {t} frames")
        return feats

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        feats = self.dropout(self.clip_features(clips))
        if not torch.is_autocast_enabled(feats.device.type):
            feats = feats.to(self.fc.weight.dtype)  # a half-precision backbone feeding an fp32 head
        return self.fc(feats)
