"""OpenAI's clip package (``clip.model.VisionTransformer``; on PyPI as clip-anytorch): the model
the official ST-Adapter code adapts. Its blocks run sequence first, x (L, N, C); the adapters see
(N, L, C). Block names (transformer.resblocks.{i}) are the official checkpoint's, so official
files map one to one. Clip features are the official model's: the last block's CLS token averaged
over frames, then ln_post (no proj); feature_dim = width.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch
from torch import nn

from .base import BlockKind, Target, adapter_and_norm, block_width, match_kind, square_or_none

__all__ = ["match", "describe", "openai_clip_pool"]


def _block_forward(self, x: torch.Tensor) -> torch.Tensor:
    # clip.model.ResidualAttentionBlock.forward
    x, normed = adapter_and_norm(self, self.adapter_pre_attn, self.ln_1, x)
    x = x + self.attention(normed)
    x, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.ln_2, x)
    x = x + self.mlp(normed)
    return x


def block_kinds() -> List[BlockKind]:
    model = sys.modules.get("clip.model")
    block = getattr(model, "ResidualAttentionBlock", None) if model is not None else None
    return [BlockKind("clip", block, _block_forward, "ln_1", norm_attrs=("ln_1", "ln_2"))] if block is not None else []


def match(block: nn.Module) -> Optional[BlockKind]:
    return match_kind(block, block_kinds())


def openai_clip_pool(module: nn.Module, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """frames (B*T, 3, H, W) -> (B, width): the model's own forward up to its transformer (read
    with a forward hook, so the embedding is the library's), CLS averaged over frames, ln_post."""
    captured = {}
    handle = module.transformer.register_forward_hook(lambda mod, args, out: captured.update(tokens=out))
    try:
        module(frames.to(module.conv1.weight.dtype))
    finally:
        handle.remove()
    cls = captured["tokens"][0]  # (L, N, C) -> CLS of every frame, (N, C)
    return module.ln_post(cls.reshape(b, t, -1).mean(dim=1))


def describe(module: nn.Module, block_path: str, blocks, kind: BlockKind) -> Target:
    width = block_width(kind, blocks[0])
    grid = None
    if hasattr(module, "input_resolution") and hasattr(module, "conv1"):
        side = int(module.input_resolution) // int(module.conv1.kernel_size[0])
        grid = square_or_none((side, side))
    return Target("openai_clip", module, block_path, blocks, kind, channels=width, num_prefix_tokens=1,
                  grid_size=grid, seq_first=True, pool=openai_clip_pool if hasattr(module, "ln_post") else None,
                  feature_dim=width)
