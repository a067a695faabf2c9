"""A tiny CLIP video model with injected ST-Adapters, for the training-stack tests (DDP, FSDP,
activation checkpointing, torch.compile, torch.export, CUDA graphs, determinism).

It is the library's own official-layout model -- st_adapter_fast.models.clip_vit.CLIPVisionTransformer,
adapters put in by inject_st_adapters, VideoClassifier on top (CLS averaged over frames, head
``fc``) -- at a size the Triton interpreter runs a training step of in seconds on CPU.

Placement: an adapter before attention in every block and before the MLP in every block but the
last. With CLS pooling, the last block's pre-MLP adapter cannot reach the logits (it changes only
spatial tokens, and nothing mixes tokens after it), so its gradient is exactly zero -- true of
the official "24x384" model too -- and it would only make the checks here weaker.
"""

from __future__ import annotations

from typing import Dict, Iterator, Tuple

import torch
from torch import nn

from st_adapter_fast import STAdapter
from st_adapter_fast.models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer, ResidualAttentionBlock
from st_adapter_fast.models.inject import inject_st_adapters, iter_st_adapters
from st_adapter_fast.models.video import VideoClassifier

FRAMES = 3
IMAGE_SIZE = 12
NUM_CLASSES = 5
# 3x3 patch grid + CLS = 10 tokens per frame, width 24, 2 heads
CONFIG = CLIPVisionConfig(input_resolution=IMAGE_SIZE, patch_size=4, width=24, layers=2, heads=2, output_dim=None)
ADAPTER_CHANNELS = 12


def adapter_modules(model: nn.Module) -> Iterator[Tuple[str, STAdapter]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, STAdapter))


def build_model(backend: str = "reference", seed: int = 0, layers: int = CONFIG.layers) -> VideoClassifier:
    """Seeded VideoClassifier: backbone frozen; adapters (random NON-ZERO parameters -- a fresh
    adapter is the identity and would make every adapter check vacuous) and head trainable."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        backbone = CLIPVisionTransformer(CLIPVisionConfig(**{**CONFIG.__dict__, "layers": layers}))
        inject_st_adapters(backbone, adapter_channels=ADAPTER_CHANNELS, positions="pre_attn",
                           backend=backend, verbose=False)
        if layers > 1:
            inject_st_adapters(backbone, adapter_channels=ADAPTER_CHANNELS, positions="pre_mlp",
                               block_indices=list(range(layers - 1)), backend=backend,
                               freeze_backbone=False, verbose=False)
        model = VideoClassifier(backbone, NUM_CLASSES, dropout=0.0)  # no dropout: runs must agree
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, adapter in adapter_modules(model):
            for p in adapter.parameters():
                scale = 0.5 if p.dim() == 1 else p[0].numel() ** -0.5
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model


def make_batch(batch: int, seed: int, frames: int = FRAMES) -> Tuple[torch.Tensor, torch.Tensor]:
    """(clips (B, 3, T, H, W), labels (B,)) from a seed, identical in every process."""
    gen = torch.Generator().manual_seed(seed)
    clips = torch.randn(batch, 3, frames, IMAGE_SIZE, IMAGE_SIZE, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return clips, labels


def is_block(module: nn.Module) -> bool:
    return isinstance(module, ResidualAttentionBlock)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # FSDP2 shards are DTensors


def trainable_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (DTensors gathered to full tensors)."""
    return {n: _full(p).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def frozen_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: _full(p).detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def trainable_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {n: _full(p.grad).detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def strip_wrapper_prefix(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Names without DDP's 'module.' or the checkpoint wrapper's prefix."""
    out = {}
    for name, t in state.items():
        name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
        out[name.removeprefix("module.")] = t
    return out


def fused_backend_or_skip(backend: str, device, dtype: torch.dtype = torch.float32) -> str:
    """``backend`` if it can run (T=1, kt=3) calls on ``device`` here, else pytest.skip with the
    backend's own reason (no GPU, extension not built, interpreter off, ...)."""
    import pytest

    from st_adapter_fast import backends

    probe = torch.empty(1, 2, 8, device=device, dtype=dtype)
    reason = backends.get_backend(backend).unavailable_reason(probe, (3, 1, 1), dtype)
    if reason is not None:
        pytest.skip(f"backend {backend!r} unavailable on {device}: {reason}")
    return backend


def assert_only_adapters_got_gradients(model: nn.Module) -> None:
    """After a backward: every adapter parameter trains and got a non-zero gradient; every other
    parameter is frozen and got none."""
    adapter_ids = {id(p) for _, a in iter_st_adapters(model) for p in a.parameters()}
    for name, p in model.named_parameters():
        if id(p) in adapter_ids:
            assert p.requires_grad and p.grad is not None and p.grad.abs().max() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
