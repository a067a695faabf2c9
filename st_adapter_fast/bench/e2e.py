"""End-to-end benchmark: a CLIP ViT-B/16 video classifier with 0, 12 (pre-MLP) or 24
(pre-attention + pre-MLP) ST-Adapters, trained and run the way the official code does it:
frozen fp16 backbone, fp32 adapters and head, fp16 autocast, GradScaler, AdamW.

The model is the library's own, as users build it: st_adapter_fast.models.clip_vit's
CLIPVisionTransformer (OpenAI CLIP's module names), adapters from inject_st_adapters (the
official names adapter_pre_attn / adapter_pre_mlp) and the VideoClassifier head ``fc``.
Provider "eager-nocudnn" is the same model with ``STAdapter.conv_cudnn = False``: cuDNN off
around the reference's conv, what the official DWCONV3D_DISABLE_CUDNN config means to do.

Note on the 0-adapter row: with a frozen backbone nothing below the head needs gradients, so
its "train step" is forward + head update only; adapter rows also backpropagate through
every block (input gradients, no weight gradients).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..models.clip_vit import CLIPVisionConfig, CLIPVisionTransformer
from ..models.inject import inject_st_adapters, iter_st_adapters
from ..models.video import VideoClassifier
from ..module import STAdapter


@dataclasses.dataclass(frozen=True)
class VitConfig:
    name: str
    width: int = 768
    layers: int = 12
    heads: int = 12
    patch: int = 16
    image: int = 224
    adapter_channels: int = 384
    num_classes: int = 400
    batch: int = 16
    frames: int = 8

    @property
    def seq_len(self) -> int:
        return 1 + (self.image // self.patch) ** 2


VIT_B16 = VitConfig("ViT-B/16")
# CPU smoke: same structure, 2 blocks of width 64, 4x4 patches grid.
VIT_TINY = VitConfig("ViT-tiny", width=64, layers=2, heads=4, patch=8, image=32, adapter_channels=32,
                     num_classes=10, batch=2, frames=4)


def adapter_layouts(cfg: VitConfig):
    """(label, adapters before attention, adapters before the MLP): '0', '12x384 pre-MLP',
    '24x384 pre-attn+pre-MLP' for ViT-B/16."""
    n, ca = cfg.layers, cfg.adapter_channels
    return [("0", False, False), (f"{n}x{ca} pre-MLP", False, True), (f"{2 * n}x{ca} pre-attn+pre-MLP", True, True)]


# "builtin" named a second copy of the ViT that this module used to carry; the package now has
# one CLIP ViT, and the name is still accepted so older command lines keep working.
BUILDERS = ("library", "builtin")


def _finish(model: nn.Module, backbone_dtype: torch.dtype) -> nn.Module:
    """Official set-up: frozen backbone in backbone_dtype; adapters and head fp32, trainable,
    adapters non-zero like trained ones (a fresh adapter is the identity)."""
    model.to(backbone_dtype)
    for name, module in model.named_modules():
        if isinstance(module, STAdapter) or name == "fc":
            module.float()
        if isinstance(module, STAdapter):
            with torch.no_grad():
                for p in (module.conv.weight, module.conv.bias, module.fc1.bias, module.fc2.bias):
                    p.normal_(0, 0.02)
    adapter_params = {id(p) for m in model.modules() if isinstance(m, STAdapter) for p in m.parameters()}
    for name, p in model.named_parameters():
        p.requires_grad_(id(p) in adapter_params or name.startswith("fc."))
    return model


def build_video_vit(cfg: VitConfig, pre_attn: bool, pre_mlp: bool, backend: str, device: str,
                    backbone_dtype: torch.dtype, cudnn_off: bool = False, builder: str = "library",
                    fuse_layernorm: bool = False) -> nn.Module:
    """The benchmark's video model: clips (B, 3, T, H, W) -> logits (B, num_classes).

    CLIPVisionTransformer + inject_st_adapters(positions) + VideoClassifier (no dropout), then
    the official precision set-up (_finish). cudnn_off: every adapter's conv_cudnn = False.
    fuse_layernorm: each adapter and the LayerNorm after it as one op (docs/design.md §7).
    """
    if builder not in BUILDERS:
        raise ValueError(f"e2e model builder must be one of {BUILDERS}, got {builder!r}")
    config = CLIPVisionConfig(input_resolution=cfg.image, patch_size=cfg.patch, width=cfg.width,
                              layers=cfg.layers, heads=cfg.heads, output_dim=None)
    with torch.device(device):
        backbone = CLIPVisionTransformer(config)
        positions = [name for name, on in (("pre_attn", pre_attn), ("pre_mlp", pre_mlp)) if on]
        if positions:
            inject_st_adapters(backbone, adapter_channels=cfg.adapter_channels, positions=positions,
                               backend=backend, fuse_layernorm=fuse_layernorm, verbose=False)
        model = VideoClassifier(backbone, cfg.num_classes, dropout=0.0)
    for _, adapter in iter_st_adapters(model):
        adapter.conv_cudnn = not cudnn_off
    return _finish(model, backbone_dtype)


class E2EBench:
    """One model on one backend: ``train_step()`` (fwd + bwd + AdamW through GradScaler) and
    ``infer()``; ``measure()`` times both and reads peak memory."""

    def __init__(self, cfg: VitConfig, pre_attn: bool, pre_mlp: bool, provider: str, device: str,
                 builder: str = "library"):
        self.cfg, self.provider, self.device = cfg, provider, device
        # "triton+ln": the Triton adapters with fuse_layernorm (the adapter + LayerNorm pair)
        fuse = provider.endswith("+ln")
        base = provider[:-3] if fuse else provider
        backend = {"eager": "reference", "eager-nocudnn": "reference", "none": "reference"}.get(base, base)
        self.cuda = device == "cuda"
        # official set-up: fp16 backbone under fp16 autocast; the CPU smoke runs fp32
        self.amp_dtype = torch.float16 if self.cuda else None
        self.model = build_video_vit(cfg, pre_attn, pre_mlp, backend, device, self.amp_dtype or torch.float32,
                                     cudnn_off=(provider == "eager-nocudnn"), builder=builder, fuse_layernorm=fuse)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.trainable, lr=1e-4)
        self.scaler = torch.amp.GradScaler(device, enabled=self.cuda)
        gen = torch.Generator(device="cpu").manual_seed(0)
        self.clips = torch.randn(cfg.batch, 3, cfg.frames, cfg.image, cfg.image, generator=gen).to(device)
        self.labels = torch.randint(0, cfg.num_classes, (cfg.batch,), generator=gen).to(device)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device, dtype=self.amp_dtype)

    def train_step(self) -> None:
        with self._autocast():
            loss = F.cross_entropy(self.model(self.clips).float(), self.labels)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)

    def infer(self) -> torch.Tensor:
        with torch.inference_mode(), self._autocast():
            return self.model(self.clips)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def _peak(self, fn) -> tuple:
        """(absolute peak, peak above what was allocated before) of one call, CUDA only."""
        self.sync()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        self.sync()
        peak = torch.cuda.max_memory_allocated()
        return peak, peak - base

    def measure(self, quick: bool, time_fn) -> dict:
        cfg, model = self.cfg, self.model
        result = {
            "num_adapters": sum(isinstance(m, STAdapter) for m in model.modules()),
            "params": sum(p.numel() for p in model.parameters()),
            "trainable_params": sum(p.numel() for p in self.trainable),
            "amp": str(self.amp_dtype).replace("torch.", "") if self.amp_dtype else None,
        }
        budget = ({"warmup_ms": 100.0, "rep_ms": 300.0 if quick else 1000.0, "min_reps": 3, "max_reps": 50}
                  if self.cuda else {"warmup_ms": 1.0, "rep_ms": 1.0, "min_reps": 2, "max_reps": 3})
        t0 = time.perf_counter()
        self.train_step()  # first step: Triton JIT, optimizer state
        self.sync()
        result["first_step_s"] = time.perf_counter() - t0
        if self.cuda:
            result["peak_train_bytes"], result["train_activation_peak_bytes"] = self._peak(self.train_step)
        train = time_fn(self.train_step, self.device, flush_l2=False, hide_host=False, loop=False, **budget)
        result["train_step_ms"] = train["time_ms"]
        result["train_clips_per_s"] = cfg.batch / (train["time_ms"] * 1e-3)
        self.infer()
        if self.cuda:
            result["peak_infer_bytes"], result["infer_activation_peak_bytes"] = self._peak(self.infer)
        else:
            result["peak_reason"] = "peak memory needs the CUDA caching allocator"
        inf = time_fn(self.infer, self.device, flush_l2=False, hide_host=False, loop=False, **budget)
        result["infer_ms"] = inf["time_ms"]
        result["infer_clips_per_s"] = cfg.batch / (inf["time_ms"] * 1e-3)
        return result

    def close(self) -> None:
        del self.model, self.opt, self.trainable, self.clips, self.labels
        if self.cuda:
            torch.cuda.empty_cache()


def run_e2e(cfg: VitConfig, pre_attn: bool, pre_mlp: bool, provider: str, device: str, quick: bool,
            time_fn, builder: str = "library") -> dict:
    bench = E2EBench(cfg, pre_attn, pre_mlp, provider, device, builder)
    try:
        return bench.measure(quick, time_fn)
    finally:
        bench.close()
