"""timm: VisionTransformer blocks (timm.models.vision_transformer.Block) and Eva blocks
(timm.models.eva.EvaBlock: EVA-02, EVA-CLIP; layer scale gamma_1/gamma_2 and the rope table
passed to every block). Prefix tokens are the model's own count (CLS + registers). Clip features:
``forward_head(forward_features(x), pre_logits=True)`` per frame (the model's configured pooling
after its final norm), averaged over frames; feature_dim = num_features.
"""

from __future__ import annotations

import sys
from typing import List, Optional

import torch
from torch import nn

from .base import BlockKind, Target, adapter_and_norm, block_width, match_kind, square_or_none

__all__ = ["match", "describe", "timm_pool"]


def _block_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # timm.models.vision_transformer.Block.forward (attn_mask / is_causal passed through)
    x, normed = adapter_and_norm(self, self.adapter_pre_attn, self.norm1, x)
    x = x + self.drop_path1(self.ls1(self.attn(normed, *args, **kwargs)))
    x, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.norm2, x)
    x = x + self.drop_path2(self.ls2(self.mlp(normed)))
    return x


def _eva_block_forward(self, x: torch.Tensor, rope: Optional[torch.Tensor] = None,
                       attn_mask: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    # timm.models.eva.EvaBlock.forward (is_causal, where the release has it, passed through)
    x, normed = adapter_and_norm(self, self.adapter_pre_attn, self.norm1, x)
    x_attn = self.attn(normed, rope=rope, attn_mask=attn_mask, **kwargs)
    if self.gamma_1 is not None:
        x_attn = self.gamma_1 * x_attn
    x = x + self.drop_path1(x_attn)
    x, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.norm2, x)
    x_mlp = self.mlp(normed)
    if self.gamma_2 is not None:
        x_mlp = self.gamma_2 * x_mlp
    x = x + self.drop_path2(x_mlp)
    return x


def _eva_check_args(target: Target, block: nn.Module, x: torch.Tensor):
    """The rope table Eva.forward_features passes its blocks, for the model's own grid."""
    rope = getattr(target.module, "rope", None)
    if rope is None:
        return (), {}
    if hasattr(rope, "feat_shape"):
        embed = rope.get_embed()
    else:
        embed = rope.get_embed(shape=tuple(target.module.patch_embed.grid_size))
    if getattr(target.module, "rope_mixed", False):
        embed = embed[0]  # one table per depth; the block's index does not matter at identity
    return (), {"rope": embed.to(x.device)}


def block_kinds() -> List[BlockKind]:
    kinds = []
    vit = sys.modules.get("timm.models.vision_transformer")
    if vit is not None:
        kinds.append(BlockKind("timm", vit.Block, _block_forward, "norm1"))
    eva = sys.modules.get("timm.models.eva")
    if eva is not None and hasattr(eva, "EvaBlock"):
        kinds.append(BlockKind("timm", eva.EvaBlock, _eva_block_forward, "norm1", _eva_check_args))
    return kinds


def match(block: nn.Module) -> Optional[BlockKind]:
    return match_kind(block, block_kinds())


def timm_pool(module: nn.Module, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    feats = module.forward_head(module.forward_features(frames), pre_logits=True)
    if feats.dim() != 2 or feats.shape[0] != b * t:
        raise ValueError(f"forward_head(pre_logits=True) gave {tuple(feats.shape)}, expected (B*T, D) = "
                         f"({b * t}, D): set the model's global_pool (e.g. 'token' or 'avg')")
    return feats.reshape(b, t, -1).mean(dim=1)


def describe(module: nn.Module, block_path: str, blocks, kind: BlockKind) -> Target:
    patch_embed = getattr(module, "patch_embed", None)
    dynamic = getattr(patch_embed, "dynamic_img_size", False) or getattr(module, "dynamic_img_size", False)
    native = getattr(patch_embed, "grid_size", None)
    grid = None if dynamic else square_or_none(native)
    is_eva = kind.adapted_forward is _eva_block_forward
    pool = timm_pool if hasattr(module, "forward_features") and hasattr(module, "forward_head") else None
    dim = getattr(module, "num_features", getattr(module, "embed_dim", None))
    return Target(
        "timm", module, block_path, blocks, kind,
        channels=block_width(kind, blocks[0]),
        num_prefix_tokens=int(getattr(module, "num_prefix_tokens", 1)), grid_size=grid,
        pool=pool, feature_dim=int(dim) if dim is not None else None,
        # an Eva block needs the rope table, which is made for the model's own grid
        check_grid=tuple(int(g) for g in native) if is_eva and native is not None else None,
    )
