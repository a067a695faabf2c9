"""Video classifier around an image ViT: clips (B, C, T, H, W) -> logits (B, num_classes).

As the official ST-Adapter model does: the B*T frames go through the backbone as one batch of
images (clip-major, row b*T + t, the layout the adapters expect), the CLS token is averaged over
frames, and a linear head ``fc`` (dropout before it) gives the logits. num_frames is set on every
ST-Adapter in the backbone on each call, so T may change between calls.

Frame features per backbone family:
  * st_adapter_fast CLIPVisionTransformer: exactly the official model -- CLS tokens of the last
    block averaged over frames, then ln_post (no CLIP projection). Official checkpoints give the
    official logits.
  * timm VisionTransformer: ``forward_head(forward_features(x), pre_logits=True)`` per frame
    (CLS after the final norm, or whatever pooling the model is configured with), averaged.
  * anything else (an open_clip image tower, ...): ``backbone(frames)`` must return (B*T, D)
    per-frame embeddings, which are averaged; pass ``feature_dim`` unless it can be read off the
    model (open_clip: ``output_dim``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .inject import set_num_frames

__all__ = ["VideoClassifier"]


def _family(backbone: nn.Module) -> str:
    if hasattr(backbone, "forward_tokens") and hasattr(backbone, "ln_post"):
        return "clip"
    if hasattr(backbone, "forward_features") and hasattr(backbone, "forward_head"):
        return "timm"
    return "embedding"


def _feature_dim(backbone: nn.Module, family: str) -> Optional[int]:
    if family == "clip":
        return int(backbone.ln_post.normalized_shape[0])
    if family == "timm":
        return int(getattr(backbone, "num_features", getattr(backbone, "embed_dim", 0))) or None
    dim = getattr(backbone, "output_dim", None)
    return int(dim) if dim is not None else None


class VideoClassifier(nn.Module):
    """clips (B, C, T, H, W) -> logits (B, num_classes): per-frame backbone, mean over frames, fc.

    Args:
        backbone: an image ViT, usually with ST-Adapters injected (inject_st_adapters).
        num_classes: head outputs.
        feature_dim: width of the pooled per-frame features; read off the backbone when None.
        dropout: before the head (the official models use 0.5).
    The head is ``fc`` (the official checkpoint's name), initialised as the official one:
    weight ~ N(0, 0.02), bias 0.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, *, feature_dim: Optional[int] = None,
                 dropout: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.family = _family(backbone)
        dim = feature_dim if feature_dim is not None else _feature_dim(backbone, self.family)
        if dim is None:
            raise ValueError(f"cannot read the feature width off a {type(backbone).__name__}: pass feature_dim")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        ref = next(backbone.parameters(), None)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, num_classes, device=ref.device if ref is not None else None)
        nn.init.normal_(self.fc.weight, std=0.02)
        nn.init.constant_(self.fc.bias, 0.0)

    def clip_features(self, clips: torch.Tensor) -> torch.Tensor:
        """clips (B, C, T, H, W) -> frame-averaged features (B, D), before dropout and fc."""
        if not isinstance(clips, torch.Tensor) or clips.dim() != 5:
            shape = tuple(clips.shape) if isinstance(clips, torch.Tensor) else type(clips).__name__
            raise ValueError(f"clips must have shape (B, C, T, H, W), got {shape}")
        b, _, t = clips.shape[:3]
        set_num_frames(self.backbone, t)
        frames = clips.transpose(1, 2).flatten(0, 1)  # (B*T, C, H, W), row b*T + t
        if self.family == "clip":
            tokens = self.backbone.forward_tokens(frames)  # (B*T, L, D) before ln_post
            cls = tokens[:, 0, :].reshape(b, t, -1).mean(dim=1)
            return self.backbone.ln_post(cls)
        if self.family == "timm":
            feats = self.backbone.forward_head(self.backbone.forward_features(frames), pre_logits=True)
        else:
            feats = self.backbone(frames)
        if feats.dim() != 2 or feats.shape[0] != b * t:
            raise ValueError(f"the backbone must return (B*T, D) = ({b * t}, D) frame features, got {tuple(feats.shape)}")
        return feats.reshape(b, t, -1).mean(dim=1)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        feats = self.dropout(self.clip_features(clips))
        if not torch.is_autocast_enabled(feats.device.type):
            feats = feats.to(self.fc.weight.dtype)  # a half-precision backbone feeding an fp32 head
        return self.fc(feats)
