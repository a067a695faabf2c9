"""Put ST-Adapters into vision transformers that already exist: timm, open_clip, our CLIP ViT.

    report = inject_st_adapters(model, adapter_channels=384, positions=("pre_attn", "pre_mlp"))
    video = VideoClassifier(model, num_classes=400)   # sets num_frames on every adapter
    logits = video(clips)                             # (B, 3, T, H, W) -> (B, 400)

As PEFT does, blocks are found by walking the model and adapters are attached with setattr on
the device and in the dtype of the block they join; the backbone is frozen. Each adapted block
gets children ``adapter_pre_attn`` / ``adapter_pre_mlp`` (the official model's names, so official
checkpoints map by block index), and -- for timm and open_clip blocks, whose forward has no
adapter slots -- an instance-level forward that is the library's own block forward with the
adapters called in between (Liger patches built models the same way: one instance, not the
class). Only blocks whose class forward is the exact one mirrored here are accepted; anything
else is a TypeError naming the class, never a silent wrong placement.

num_frames reaches the adapters as a plain attribute (``adapter.num_frames``) set by
:func:`set_num_frames` / :func:`using_num_frames` or by the video wrapper on every call, so the
model's own forward signature never changes and T may differ from one call to the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import numbers
import sys
import types
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..module import STAdapter

__all__ = [
    "inject_st_adapters", "remove_st_adapters", "InjectionReport", "set_num_frames",
    "using_num_frames", "adapter_num_frames", "iter_st_adapters", "count_parameters", "POSITIONS",
]

POSITIONS = ("pre_attn", "pre_mlp")
_ATTR = {"pre_attn": "adapter_pre_attn", "pre_mlp": "adapter_pre_mlp"}


# ----------------------------------------------------------------------------- num_frames
def _check_num_frames(num_frames) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return int(num_frames)


def iter_st_adapters(model: nn.Module) -> Iterator[Tuple[str, STAdapter]]:
    """(qualified name, adapter) for every STAdapter in model."""
    for name, module in model.named_modules():
        if isinstance(module, STAdapter):
            yield name, module


def set_num_frames(model: nn.Module, num_frames: int) -> int:
    """Tell every ST-Adapter in model how many frames each clip has; returns how many it set."""
    num_frames = _check_num_frames(num_frames)
    count = 0
    for _, adapter in iter_st_adapters(model):
        adapter.num_frames = num_frames
        count += 1
    return count


@contextlib.contextmanager
def using_num_frames(model: nn.Module, num_frames: int):
    """``with using_num_frames(model, 8): feats = model(frames)`` -- frames (B*8, 3, H, W)."""
    adapters = [a for _, a in iter_st_adapters(model)]
    previous = [getattr(a, "num_frames", None) for a in adapters]
    set_num_frames(model, num_frames)
    try:
        yield model
    finally:
        for adapter, value in zip(adapters, previous):
            adapter.num_frames = value


def adapter_num_frames(adapter: nn.Module, explicit: Optional[int] = None) -> int:
    """T for one adapter call: the explicit value if given, else the one set on the adapter."""
    if explicit is not None:
        return explicit
    num_frames = getattr(adapter, "num_frames", None)
    if num_frames is None:
        raise RuntimeError(
            "num_frames is not set on the ST-Adapters: wrap the model in "
            "st_adapter_fast.models.video.VideoClassifier (clips (B, C, T, H, W)), or call "
            "st_adapter_fast.models.inject.set_num_frames(model, T) / use "
            "`with using_num_frames(model, T):` before feeding (B*T, C, H, W) frames"
        )
    return num_frames


def _run_adapter(block: nn.Module, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if getattr(block, "st_adapter_seq_first", False):  # open_clip with batch_first=False: (L, N, C)
        return adapter(x.transpose(0, 1), adapter_num_frames(adapter)).transpose(0, 1)
    return adapter(x, adapter_num_frames(adapter))


# ------------------------------------------------------------- block forwards with adapters
# Each mirrors the library's own block forward line by line, with the adapters in between.
def _timm_block_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    # timm.models.vision_transformer.Block.forward (attn_mask / is_causal passed through)
    if self.adapter_pre_attn is not None:
        x = _run_adapter(self, self.adapter_pre_attn, x)
    x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), *args, **kwargs)))
    if self.adapter_pre_mlp is not None:
        x = _run_adapter(self, self.adapter_pre_mlp, x)
    x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
    return x


def _open_clip_block_forward(self, q_x, k_x=None, v_x=None, attn_mask=None):
    # open_clip.transformer.ResidualAttentionBlock.forward
    if self.adapter_pre_attn is not None:
        q_x = _run_adapter(self, self.adapter_pre_attn, q_x)
    k_x = self.ln_1_kv(k_x) if hasattr(self, "ln_1_kv") and k_x is not None else None
    v_x = self.ln_1_kv(v_x) if hasattr(self, "ln_1_kv") and v_x is not None else None
    x = q_x + self.ls_1(self.attention(q_x=self.ln_1(q_x), k_x=k_x, v_x=v_x, attn_mask=attn_mask))
    if self.adapter_pre_mlp is not None:
        x = _run_adapter(self, self.adapter_pre_mlp, x)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    return x


def _open_clip_custom_block_forward(self, x, attn_mask=None):
    # open_clip.transformer.CustomResidualAttentionBlock.forward
    if self.adapter_pre_attn is not None:
        x = _run_adapter(self, self.adapter_pre_attn, x)
    x = x + self.ls_1(self.ln_attn(self.attn(self.ln_1(x), attn_mask=attn_mask)))
    if self.adapter_pre_mlp is not None:
        x = _run_adapter(self, self.adapter_pre_mlp, x)
    x = x + self.ls_2(self.mlp(self.ln_2(x)))
    return x


def _known_block_forwards() -> Dict[object, Tuple[str, object, str]]:
    """{library's block forward: (family, our adapted forward, norm attr giving C)} for the
    libraries already imported (a model of theirs exists only if they are)."""
    known = {}
    timm_vit = sys.modules.get("timm.models.vision_transformer")
    if timm_vit is not None:
        known[timm_vit.Block.forward] = ("timm", _timm_block_forward, "norm1")
    oc = sys.modules.get("open_clip.transformer")
    if oc is not None:
        known[oc.ResidualAttentionBlock.forward] = ("open_clip", _open_clip_block_forward, "ln_1")
        if hasattr(oc, "CustomResidualAttentionBlock"):
            known[oc.CustomResidualAttentionBlock.forward] = ("open_clip", _open_clip_custom_block_forward, "ln_1")
    return known


# -------------------------------------------------------------------------------- detection
@dataclasses.dataclass
class _Target:
    family: str  # "clip" (our CLIPVisionTransformer-style blocks), "timm", "open_clip"
    module: nn.Module  # the vision transformer holding the blocks
    block_path: str  # "blocks" or "transformer.resblocks", relative to module
    blocks: Sequence[nn.Module]
    adapted_forward: Optional[object]  # None when the block's own forward has adapter slots
    channels: int
    num_prefix_tokens: int
    grid_size: Optional[Tuple[int, int]]
    seq_first: bool


def _square_or_none(grid) -> Optional[Tuple[int, int]]:
    if grid is None:
        return None
    h, w = int(grid[0]), int(grid[1])
    # a square grid is inferred per call, so other square resolutions keep working
    return None if h == w else (h, w)


def _find_target(model: nn.Module) -> Tuple[nn.Module, str]:
    """The vision transformer inside model (unwrapping our VideoClassifier and an open_clip CLIP)
    and the prefix of its qualified names within model."""
    prefix = ""
    module = model
    # VideoClassifier.backbone; an open_clip / OpenAI CLIP's .visual (its .transformer is text)
    for attr in ("backbone", "visual"):
        inner = getattr(module, attr, None)
        if isinstance(inner, nn.Module) and (_has_blocks(inner) or attr == "backbone"):
            module, prefix = inner, prefix + attr + "."
    return module, prefix


def _has_blocks(module: nn.Module) -> bool:
    transformer = getattr(module, "transformer", None)
    return isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)) or (
        isinstance(transformer, nn.Module) and isinstance(getattr(transformer, "resblocks", None), nn.ModuleList))


def _describe_target(module: nn.Module) -> _Target:
    if isinstance(getattr(module, "blocks", None), (nn.Sequential, nn.ModuleList)):
        block_path, blocks = "blocks", module.blocks
    elif _has_blocks(module):
        block_path, blocks = "transformer.resblocks", module.transformer.resblocks
    else:
        raise TypeError(
            f"{type(module).__name__} has no transformer blocks where ST-Adapters go: expected a timm "
            f"VisionTransformer (.blocks), an open_clip VisionTransformer or a CLIP-style ViT "
            f"(.transformer.resblocks)"
        )
    if len(blocks) == 0:
        raise ValueError(f"{type(module).__name__}.{block_path} is empty")
    first = blocks[0]
    known = _known_block_forwards()
    if getattr(type(first), "supports_st_adapters", False):
        family, adapted_forward, norm_attr = "clip", None, "ln_1"
    elif type(first).forward in known:
        family, adapted_forward, norm_attr = known[type(first).forward]
    else:
        raise TypeError(
            f"cannot place ST-Adapters in blocks of type {type(first).__module__}.{type(first).__name__}: "
            f"supported are timm.models.vision_transformer.Block, open_clip's ResidualAttentionBlock / "
            f"CustomResidualAttentionBlock and st_adapter_fast.models.clip_vit.ResidualAttentionBlock"
        )
    for i, block in enumerate(blocks):
        if type(block) is not type(first):
            raise TypeError(f"{block_path}[{i}] is a {type(block).__name__}, {block_path}[0] a "
                            f"{type(first).__name__}: mixed block types are not supported")
    channels = int(getattr(first, norm_attr).normalized_shape[0])

    seq_first = False
    if family == "timm":
        prefix_tokens = int(getattr(module, "num_prefix_tokens", 1))
        patch_embed = getattr(module, "patch_embed", None)
        dynamic = getattr(patch_embed, "dynamic_img_size", False) or getattr(module, "dynamic_img_size", False)
        grid = None if dynamic else getattr(patch_embed, "grid_size", None)
    elif family == "open_clip":
        prefix_tokens = 1  # open_clip's image tower has one CLS token
        grid = getattr(module, "grid_size", None)
        seq_first = not getattr(module.transformer, "batch_first", True)
    else:
        prefix_tokens = int(getattr(module, "num_prefix_tokens", 1))
        grid = None
    return _Target(family, module, block_path, blocks, adapted_forward, channels, prefix_tokens,
                   _square_or_none(grid), seq_first)


# -------------------------------------------------------------------------------- injection
@dataclasses.dataclass
class InjectionReport:
    family: str
    adapters: List[str]  # qualified names in the model passed in
    block_indices: List[int]
    positions: Tuple[str, ...]
    channels: int
    adapter_channels: int
    kernel_size: Tuple[int, int, int]
    num_prefix_tokens: int
    backend: str
    adapter_params: int
    trainable_params: int
    total_params: int

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        blocks = (f"{self.block_indices[0]}-{self.block_indices[-1]}"
                  if self.block_indices == list(range(self.block_indices[0], self.block_indices[-1] + 1))
                  else ",".join(map(str, self.block_indices)))
        return (f"ST-Adapters: {len(self.adapters)} x {self.channels}->{self.adapter_channels} "
                f"kernel {self.kernel_size} ({'+'.join(self.positions)}) in {self.family} blocks {blocks}, "
                f"prefix tokens {self.num_prefix_tokens}, backend {self.backend!r}; "
                f"trainable params: {self.trainable_params:,} / {self.total_params:,} ({pct:.2f}%), "
                f"adapters {self.adapter_params:,}")


def count_parameters(model: nn.Module) -> Tuple[int, int]:
    """(trainable, total) parameter counts, shared parameters counted once."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total


def _resolve_blocks(num_blocks: int, last_n_blocks, block_indices) -> List[int]:
    if last_n_blocks is not None and block_indices is not None:
        raise ValueError("pass last_n_blocks or block_indices, not both")
    if block_indices is not None:
        if isinstance(block_indices, numbers.Integral):
            block_indices = [block_indices]
        out = set()
        for i in block_indices:
            if isinstance(i, bool) or not isinstance(i, numbers.Integral):
                raise TypeError(f"block_indices must hold ints, got {type(i).__name__}")
            if not -num_blocks <= i < num_blocks:
                raise ValueError(f"block index {i} is out of range for {num_blocks} blocks")
            out.add(int(i) % num_blocks)
        if not out:
            raise ValueError("block_indices is empty")
        return sorted(out)
    if last_n_blocks is None:
        return list(range(num_blocks))
    if isinstance(last_n_blocks, bool) or not isinstance(last_n_blocks, numbers.Integral):
        raise TypeError(f"last_n_blocks must be an int or None, got {type(last_n_blocks).__name__}")
    if not 1 <= last_n_blocks <= num_blocks:
        raise ValueError(f"last_n_blocks must be in [1, {num_blocks}], got {last_n_blocks}")
    return list(range(num_blocks - last_n_blocks, num_blocks))


def _resolve_width(adapter_channels, channels: int) -> int:
    if isinstance(adapter_channels, bool):
        raise TypeError("adapter_channels must be an int or a float fraction of the width, got bool")
    if isinstance(adapter_channels, numbers.Integral):
        width = int(adapter_channels)
    elif isinstance(adapter_channels, numbers.Real):
        if adapter_channels <= 0:
            raise ValueError(f"adapter_channels as a fraction of the width must be > 0, got {adapter_channels}")
        width = int(round(channels * float(adapter_channels)))
    else:
        raise TypeError(f"adapter_channels must be an int or a float, got {type(adapter_channels).__name__}")
    if width < 1:
        raise ValueError(f"adapter_channels must give >= 1 channel, got {adapter_channels} for width {channels}")
    return width


def inject_st_adapters(
    model: nn.Module,
    *,
    adapter_channels: Union[int, float] = 384,
    kernel_size: Union[int, Sequence[int]] = (3, 1, 1),
    positions: Union[str, Sequence[str]] = ("pre_mlp",),
    last_n_blocks: Optional[int] = None,
    block_indices: Optional[Sequence[int]] = None,
    backend: str = "auto",
    num_prefix_tokens: Optional[int] = None,
    freeze_backbone: bool = True,
    verbose: bool = True,
) -> InjectionReport:
    """Insert STAdapters before attention and/or the MLP of a vision transformer's blocks.

    Args:
        model: a timm VisionTransformer, an open_clip VisionTransformer (or the CLIP model holding
            it as .visual), a st_adapter_fast CLIPVisionTransformer, or a VideoClassifier around one.
        adapter_channels: Ca, an int, or a float fraction of the model width (0.5 -> C/2).
        kernel_size: depthwise conv kernel (kt, kh, kw) or kt; the official models use (3, 1, 1).
        positions: "pre_attn", "pre_mlp" or both ("24x384" = both, "12x384" = pre_mlp only).
        last_n_blocks: adapt the last n blocks (None = all; the official models adapt all);
        block_indices: or exactly these blocks (negative indices count from the end).
        backend: "auto" | "reference" | "triton" | "cuda", passed to every STAdapter.
        num_prefix_tokens: tokens before the patch grid left unchanged; None reads it from the
            model (timm: model.num_prefix_tokens, CLS + registers; open_clip and CLIP: 1).
        freeze_backbone: set requires_grad=False on the vision transformer's own parameters
            (a VideoClassifier's head stays trainable); adapters are always trainable.
        verbose: print the report (trainable parameter counts).

    Adapters are created on the device and in the dtype of the block they join; a fresh adapter
    is the identity, so the model's outputs do not change until it trains. Returns an
    InjectionReport. Raises TypeError for unsupported models/blocks, ValueError for bad options
    or blocks that already hold an adapter at a requested position.
    """
    if isinstance(positions, str):
        positions = (positions,)
    positions = tuple(positions)
    if not positions or any(p not in POSITIONS for p in positions) or len(set(positions)) != len(positions):
        raise ValueError(f"positions must be a non-empty subset of {POSITIONS}, got {positions}")
    positions = tuple(p for p in POSITIONS if p in positions)  # official order: pre_attn first

    module, prefix = _find_target(model)
    target = _describe_target(module)
    indices = _resolve_blocks(len(target.blocks), last_n_blocks, block_indices)
    width = _resolve_width(adapter_channels, target.channels)
    prefix_tokens = target.num_prefix_tokens if num_prefix_tokens is None else num_prefix_tokens
    if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, numbers.Integral) or prefix_tokens < 0:
        raise ValueError(f"num_prefix_tokens must be an int >= 0, got {prefix_tokens!r}")

    for i in indices:
        for pos in positions:
            if getattr(target.blocks[i], _ATTR[pos], None) is not None:
                raise ValueError(f"{prefix}{target.block_path}.{i} already has an {_ATTR[pos]}; "
                                 f"call remove_st_adapters(model) first")

    if freeze_backbone:
        # everything but a VideoClassifier's head: a whole open_clip CLIP freezes its text tower too
        frozen = model.backbone if prefix.startswith("backbone.") else model
        for p in frozen.parameters():
            p.requires_grad_(False)

    names, adapter_params = [], 0
    for i in indices:
        block = target.blocks[i]
        ref = next(block.parameters(), None)
        factory = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        for pos in POSITIONS:
            if pos in positions:
                adapter = STAdapter(target.channels, width, kernel_size, num_prefix_tokens=int(prefix_tokens),
                                    backend=backend, grid_size=target.grid_size, **factory)
                adapter.num_frames = None  # set per call by set_num_frames / VideoClassifier
                setattr(block, _ATTR[pos], adapter)
                adapter_params += sum(p.numel() for p in adapter.parameters())
                names.append(f"{prefix}{target.block_path}.{i}.{_ATTR[pos]}")
            elif not hasattr(block, _ATTR[pos]):
                setattr(block, _ATTR[pos], None)  # the adapted forward reads both slots
        if target.adapted_forward is not None:
            block.st_adapter_seq_first = target.seq_first
            block.forward = types.MethodType(target.adapted_forward, block)

    trainable, total = count_parameters(model)
    report = InjectionReport(
        family=target.family, adapters=names, block_indices=indices, positions=positions,
        channels=target.channels, adapter_channels=width,
        kernel_size=tuple(next(iter_st_adapters(target.blocks[indices[0]]))[1].kernel_size),
        num_prefix_tokens=int(prefix_tokens), backend=backend, adapter_params=adapter_params,
        trainable_params=trainable, total_params=total,
    )
    if verbose:
        print(report)
    return report


def remove_st_adapters(model: nn.Module) -> int:
    """Undo inject_st_adapters: drop every adapter and the patched forwards; returns how many
    adapters it removed. requires_grad flags are left as they are."""
    module, _ = _find_target(model)
    target = _describe_target(module)
    removed = 0
    for block in target.blocks:
        for attr in _ATTR.values():
            if getattr(block, attr, None) is not None:
                removed += 1
            if attr in block._modules:
                del block._modules[attr]
            if target.adapted_forward is not None and attr in block.__dict__:
                del block.__dict__[attr]
            if target.adapted_forward is None:
                setattr(block, attr, None)  # our CLIP blocks keep their (empty) slots
        if "forward" in block.__dict__:
            del block.__dict__["forward"]
        block.__dict__.pop("st_adapter_seq_first", None)
    return removed
