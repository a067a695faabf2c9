"""A tiny CLIP-style video ViT with ST-Adapters, for the training-stack tests (DDP, FSDP,
activation checkpointing, torch.compile, torch.export, determinism).

Same layout as the official ST-Adapter model (linziyi96/st-adapter): a frozen image ViT whose
residual blocks get an adapter before attention and before the MLP, frames folded into the
batch as (B*T, L, C), video logits = head(mean over frames of the pooled tokens). Sizes are tiny so
the Triton interpreter runs a training step in seconds on CPU.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterator, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from st_adapter_fast import STAdapter


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    frames: int = 3
    image_size: int = 12
    patch_size: int = 4  # 3x3 grid + CLS = 10 tokens per frame
    width: int = 24
    heads: int = 2
    depth: int = 2
    adapter_channels: int = 12
    num_classes: int = 5

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


class Attention(nn.Module):
    """Multi-head self-attention on (N, L, C) with SDPA (traceable by export and dynamo)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, seq_len, c = x.shape
        q, k, v = self.qkv(x).view(n, seq_len, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(n, seq_len, c))


class ResidualBlock(nn.Module):
    """CLIP residual block with ST-Adapters before attention and before the MLP ("24x" recipe)."""

    def __init__(self, cfg: TinyConfig, backend: str):
        super().__init__()
        self.adapter_pre_attn = STAdapter(cfg.width, cfg.adapter_channels, backend=backend)
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg.width, cfg.heads)
        self.adapter_pre_mlp = STAdapter(cfg.width, cfg.adapter_channels, backend=backend)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Sequential(nn.Linear(cfg.width, 4 * cfg.width), nn.GELU(), nn.Linear(4 * cfg.width, cfg.width))

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        x = self.adapter_pre_attn(x, num_frames)
        x = x + self.attn(self.ln_1(x))
        x = self.adapter_pre_mlp(x, num_frames)
        return x + self.mlp(self.ln_2(x))


class TinyVideoCLIP(nn.Module):
    """video (B, T, 3, H, W) -> logits (B, num_classes)."""

    def __init__(self, cfg: TinyConfig = TinyConfig(), backend: str = "reference"):
        super().__init__()
        self.cfg = cfg
        # wrap every residual block in torch.utils.checkpoint (non-reentrant) when training
        self.activation_checkpointing = False
        self.patch_embed = nn.Conv2d(3, cfg.width, cfg.patch_size, cfg.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * 0.5)
        self.positional_embedding = nn.Parameter(torch.randn(1 + cfg.grid ** 2, cfg.width) * 0.5)
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.blocks = nn.ModuleList(ResidualBlock(cfg, backend) for _ in range(cfg.depth))
        self.ln_post = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.num_classes)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        x = self.patch_embed(video.flatten(0, 1)).flatten(2).transpose(1, 2)  # (B*T, S, C)
        cls = self.class_embedding.expand(x.shape[0], 1, -1)
        x = self.ln_pre(torch.cat([cls, x], dim=1) + self.positional_embedding)  # (B*T, L, C)
        for block in self.blocks:
            if self.activation_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, t, use_reentrant=False)
            else:
                x = block(x, t)
        # Pool all tokens, not CLS alone as CLIP does: with CLS pooling the last block's pre-MLP
        # adapter (spatial tokens only, no attention after it) gets an all-zero gradient.
        return self.head(self.ln_post(x).mean(1).view(b, t, -1).mean(1))


def adapter_modules(model: nn.Module) -> Iterator[Tuple[str, STAdapter]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, STAdapter))


def build_model(cfg: TinyConfig = TinyConfig(), backend: str = "reference", seed: int = 0) -> TinyVideoCLIP:
    """Seeded model: backbone frozen, adapters trainable with random NON-ZERO parameters (a
    fresh adapter is the identity, and would make every adapter check vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyVideoCLIP(cfg, backend)
    for name, p in model.named_parameters():
        p.requires_grad_(False)
    for _, adapter in adapter_modules(model):
        for p in adapter.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if p.dim() == 1 else p[0].numel() ** -0.5))
            p.requires_grad_(True)
    return model


def make_batch(cfg: TinyConfig, batch: int, seed: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(video (B, T, 3, H, W), labels (B,)) from a seed, identical in every process."""
    gen = torch.Generator().manual_seed(seed)
    video = torch.randn(batch, cfg.frames, 3, cfg.image_size, cfg.image_size, generator=gen)
    labels = torch.randint(0, cfg.num_classes, (batch,), generator=gen)
    return video, labels


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (DTensors gathered to full tensors)."""
    return {n: _full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: _full(p).detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def trainable_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def strip_wrapper_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Names without DDP's 'module.' or checkpoint wrappers' prefixes."""
    out = {}
    for name, t in state.items():
        for prefix in ("module.", "_orig_mod.", "_checkpoint_wrapped_module."):
            name = name.replace(prefix, "")
        out[name] = t
    return out
