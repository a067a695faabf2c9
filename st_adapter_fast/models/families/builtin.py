"""st_adapter_fast's own CLIP ViT (models/clip_vit.py): its blocks already call the adapter
slots, so nothing is patched; clip features are the official model's (CLS of the last block
averaged over frames, then ln_post)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import BlockKind, Target

__all__ = ["match", "describe", "official_pool"]


def match(block: nn.Module) -> Optional[BlockKind]:
    # an attribute, not an import of clip_vit (which imports inject, which imports this)
    if getattr(type(block), "supports_st_adapters", False):
        return BlockKind("st_adapter_fast", type(block), None, "ln_1", norm_attrs=("ln_1", "ln_2"))
    return None


def official_pool(module: nn.Module, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """models_adapter.VisionTransformer: mean over frames of the last block's CLS, then ln_post.
    frames (B*T, 3, H, W) -> (B, C)."""
    tokens = module.forward_tokens(frames)  # (B*T, L, C) before ln_post
    return module.ln_post(tokens[:, 0, :].reshape(b, t, -1).mean(dim=1))


def describe(module: nn.Module, block_path: str, blocks, kind: BlockKind) -> Target:
    channels = int(blocks[0].ln_1.normalized_shape[0])
    pool = official_pool if hasattr(module, "forward_tokens") and hasattr(module, "ln_post") else None
    return Target("clip", module, block_path, blocks, kind, channels,
                  int(getattr(module, "num_prefix_tokens", 1)), None, pool=pool,
                  feature_dim=int(module.ln_post.normalized_shape[0]) if pool else None)
