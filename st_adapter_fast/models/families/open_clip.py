"""open_clip's image tower: ResidualAttentionBlock / CustomResidualAttentionBlock, batch first or
(Transformer(batch_first=False)) sequence first. Clip features: the tower's own output (its
pooling, ln_post and proj) averaged over frames; feature_dim = output_dim."""

from __future__ import annotations

import sys
from typing import List, Optional

import torch
from torch import nn

from .base import BlockKind, Target, adapter_and_norm, block_width, match_kind, square_or_none

__all__ = ["match", "describe"]


def _block_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
    # open_clip.transformer.ResidualAttentionBlock.forward
    q_x, normed = adapter_and_norm(self, self.adapter_pre_attn, self.ln_1, q_x)
    k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
    v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
    x = q_x + self.ls_1(self.attention(q_x=normed, k_x=k_x, v_x=v_x, attn_mask=attn_mask))
    x, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.ln_2, x)
    x = x + self.ls_2(self.mlp(normed))
    return x


def _custom_block_forward(self, x, attn_mask=None):
    # open_clip.transformer.CustomResidualAttentionBlock.forward
    x, normed = adapter_and_norm(self, self.adapter_pre_attn, self.ln_1, x)
    x = x + self.ls_1(self.ln_attn(self.attn(normed, attn_mask=attn_mask)))
    x, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.ln_2, x)
    x = x + self.ls_2(self.mlp(normed))
    return x


def block_kinds() -> List[BlockKind]:
    oc = sys.modules.get("open_clip.transformer")
    if oc is None:
        return []
    kinds = [BlockKind("open_clip", oc.ResidualAttentionBlock, _block_forward, "ln_1", norm_attrs=("ln_1", "ln_2"))]
    if hasattr(oc, "CustomResidualAttentionBlock"):
        kinds.append(BlockKind("open_clip", oc.CustomResidualAttentionBlock, _custom_block_forward, "ln_1",
                               norm_attrs=("ln_1", "ln_2")))
    return kinds


def embedding_pool(module: nn.Module, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """module(frames) -> (B*T, D) embeddings, averaged over frames -> (B, D)."""
    feats = module(frames)
    if isinstance(feats, tuple):  # output_tokens=True towers return (pooled, tokens)
        feats = feats[0]
    if feats.dim() != 2 or feats.shape[0] != b * t:
        raise ValueError(f"the backbone must return (B*T, D) = ({b * t}, D) frame features, got {tuple(feats.shape)}")
    return feats.reshape(b, t, -1).mean(dim=1)


def describe(module: nn.Module, block_path: str, blocks, kind: BlockKind) -> Target:
    output_dim = getattr(module, "output_dim", None)
    return Target(
        "open_clip", module, block_path, blocks, kind,
        channels=block_width(kind, blocks[0]),
        num_prefix_tokens=1,  # open_clip's image tower has one CLS token
        grid_size=square_or_none(getattr(module, "grid_size", None)),
        seq_first=not getattr(module.transformer, "batch_first", True),
        pool=embedding_pool if output_dim is not None else None,
        feature_dim=int(output_dim) if output_dim is not None else None,
    )


def match(block: nn.Module) -> Optional[BlockKind]:
    return match_kind(block, block_kinds())
