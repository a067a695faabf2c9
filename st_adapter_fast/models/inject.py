"""Put ST-Adapters into vision transformers that already exist: timm (ViT, Eva), open_clip,
OpenAI clip, HF transformers (CLIP, SigLIP, DINOv2), and our CLIP ViT.

    report = inject_st_adapters(model, adapter_channels=384, positions=("pre_attn", "pre_mlp"))
    video = VideoClassifier(model, num_classes=400)   # sets num_frames on every adapter
    logits = video(clips)                             # (B, 3, T, H, W) -> (B, 400)

As PEFT does, blocks are found by walking the model and adapters are attached with setattr on
the device and in the dtype of the block they join; the backbone is frozen. Each adapted block
gets children ``adapter_pre_attn`` / ``adapter_pre_mlp`` (the official model's names, so official
checkpoints map by block index), and -- for library blocks, whose forward has no adapter slots --
an instance-level forward that is the library's own block forward with the adapters called in
between (Liger patches built models the same way: one instance, not the class).

This module is the registry and the common code; each family lives in models/families/ (one
module per library: how its blocks are found, its adapted block forwards, its clip pooling).
A block class not in a family is a TypeError naming it, never a silent wrong placement. Because
an adapted forward mirrors the library's line by line, injection checks itself: the library's
block forward and the adapted one run once on a few random tokens with identity adapters and
must agree exactly, or a TypeError names the installed library version (``check=False`` skips it).

num_frames reaches the adapters as a plain attribute (``adapter.num_frames``) set by
:func:`set_num_frames` / :func:`using_num_frames` or by the video wrapper on every call, so the
model's own forward signature never changes and T may differ from one call to the next.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import numbers
import types
import warnings
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..module import STAdapter
from .families import builtin, hf, open_clip, openai_clip, timm
from .families.base import (
    Target, adapter_num_frames, check_num_frames, layernorm_rule, library_version, random_tokens, run_adapter,
)

__all__ = [
    "inject_st_adapters", "remove_st_adapters", "InjectionReport", "set_num_frames",
    "using_num_frames", "adapter_num_frames", "iter_st_adapters", "count_parameters", "POSITIONS",
    "find_vision_transformer", "describe_model", "self_check", "Target", "run_adapter", "FAMILIES",
]

POSITIONS = ("pre_attn", "pre_mlp")
_ATTR = {"pre_attn": "adapter_pre_attn", "pre_mlp": "adapter_pre_mlp"}


# ----------------------------------------------------------------------------- num_frames
def iter_st_adapters(model: nn.Module) -> Iterator[Tuple[str, STAdapter]]:
    """(qualified name, adapter) for every STAdapter in model."""
    for name, module in model.named_modules():
        if isinstance(module, STAdapter):
            yield name, module


def set_num_frames(model: nn.Module, num_frames: int) -> int:
    """Tell every ST-Adapter in model how many frames each clip has; returns how many it set."""
    num_frames = check_num_frames(num_frames)
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


# -------------------------------------------------------------------------------- detection
# The registry: every family, in the order their blocks are tried. Each module has
# match(block) -> BlockKind | None and describe(module, block_path, blocks, kind) -> Target.
FAMILIES = (builtin, timm, open_clip, openai_clip, hf)
# where the blocks of each layout live, relative to the vision transformer
BLOCK_PATHS = ("blocks", "transformer.resblocks", "encoder.layers", "encoder.layer")
# attributes holding the image tower of a wrapper: open_clip / OpenAI CLIP .visual, HF
# .vision_model (a CLIPModel's, a CLIPVisionModelWithProjection's; twice in a SiglipModel)
_TOWER_ATTRS = ("visual", "vision_model")
_SUPPORTED = ("timm VisionTransformer (Block) and Eva (EvaBlock), open_clip and OpenAI clip "
              "VisionTransformers, HF transformers CLIPVisionModel / CLIPVisionModelWithProjection / "
              "CLIPModel, SiglipVisionModel, Dinov2Model, Dinov2WithRegistersModel, and "
              "st_adapter_fast.models.clip_vit.CLIPVisionTransformer")


def _blocks_of(module: nn.Module) -> Optional[Tuple[str, Sequence[nn.Module]]]:
    for path in BLOCK_PATHS:
        blocks = module
        for attr in path.split("."):
            blocks = getattr(blocks, attr, None)
        if isinstance(blocks, (nn.Sequential, nn.ModuleList)):
            return path, blocks
    return None


def find_vision_transformer(model: nn.Module) -> Tuple[nn.Module, str]:
    """The vision transformer inside model (unwrapping a VideoClassifier's .backbone, open_clip /
    OpenAI CLIP's .visual, HF .vision_model) and the prefix of its qualified names in model:
    ("", model) for a bare ViT, "backbone.visual." for a VideoClassifier around an open_clip CLIP."""
    module, prefix = model, ""
    inner = getattr(model, "backbone", None)
    if isinstance(inner, nn.Module):
        module, prefix = inner, "backbone."
    descended = True
    while descended:  # the image tower first: an open_clip CLIP's own .transformer is its text tower
        descended = False
        for attr in _TOWER_ATTRS:
            inner = getattr(module, attr, None)
            if isinstance(inner, nn.Module):
                module, prefix, descended = inner, prefix + attr + ".", True
                break
    return module, prefix


def _describe_target(module: nn.Module) -> Target:
    found = _blocks_of(module)
    if found is None:
        raise TypeError(f"{type(module).__name__} has no transformer blocks where ST-Adapters go: "
                        f"supported are {_SUPPORTED}")
    block_path, blocks = found
    if len(blocks) == 0:
        raise ValueError(f"{type(module).__name__}.{block_path} is empty")
    first = blocks[0]
    for family in FAMILIES:
        kind = family.match(first)
        if kind is not None:
            break
    else:
        raise TypeError(f"cannot place ST-Adapters in blocks of type {type(first).__module__}."
                        f"{type(first).__name__}: supported are {_SUPPORTED}")
    for i, block in enumerate(blocks):
        if type(block) is not type(first):
            raise TypeError(f"{block_path}[{i}] is a {type(block).__name__}, {block_path}[0] a "
                            f"{type(first).__name__}: mixed block types are not supported")
    return family.describe(module, block_path, blocks, kind)


def _find_target(model: nn.Module) -> Tuple[Target, str]:
    module, prefix = find_vision_transformer(model)
    return _describe_target(module), prefix


def describe_model(model: nn.Module) -> Target:
    """The Target (family, blocks, width, prefix tokens, pooling) of the ViT inside model."""
    return _find_target(model)[0]


# ------------------------------------------------------------------------------ self-check
def _outputs_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape \
            and torch.equal(a, b)
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b))
    return a is b or a == b


def _max_difference(a, b) -> str:
    a = a[0] if isinstance(a, (tuple, list)) and a else a
    b = b[0] if isinstance(b, (tuple, list)) and b else b
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape:
        return f"max abs difference {(a.double() - b.double()).abs().max().item():.3g}"
    def describe(v):
        return f"{type(v).__name__}{tuple(getattr(v, 'shape', ()))}"

    return f"outputs {describe(a)} vs {describe(b)}"


def self_check(target: Target, block: nn.Module, positions: Sequence[str]) -> None:
    """Run the library's block forward and the adapted one on a few random tokens, adapters at
    their identity init, on a copy of ``block``; they must agree exactly. Raises TypeError
    ("the installed <lib> <version> changed <Block>.forward") when they do not: the mirrored
    forward no longer is the library's, and training it would train a different model."""
    kind = target.kind
    twin = copy.deepcopy(block).eval()  # eval: dropout / drop path off; the caller's block untouched
    ref = next(twin.parameters())
    for pos in POSITIONS:
        adapter = None
        if pos in positions:
            with torch.random.fork_rng(devices=[]):  # the caller's RNG stream stays as it was
                adapter = STAdapter(target.channels, 4, (3, 1, 1), num_prefix_tokens=target.num_prefix_tokens,
                                    backend="reference", grid_size=target.grid_size)
            adapter = adapter.to(device=ref.device, dtype=ref.dtype)
            adapter.num_frames = 1
        twin._modules[_ATTR[pos]] = adapter
    twin.st_adapter_seq_first = target.seq_first
    x = random_tokens(target, twin)
    args, kwargs = kind.check_args(target, twin, x)
    library = f"the installed {kind.library} {library_version(kind.library)}"
    block_name = kind.block_class.__qualname__
    with torch.no_grad():
        try:
            want = kind.block_class.forward(twin, x, *args, **kwargs)
        except Exception as err:
            raise TypeError(f"{library} changed {block_name}.forward: the self-check cannot call it on "
                            f"{tuple(x.shape)} tokens ({type(err).__name__}: {err}); check=False skips "
                            f"this check") from err
        try:
            got = kind.adapted_forward(twin, x, *args, **kwargs)
        except Exception as err:
            raise TypeError(f"{library} changed {block_name}.forward: its adapted copy in st_adapter_fast "
                            f"fails on it ({type(err).__name__}: {err}); check=False skips this check") from err
    if not _outputs_equal(want, got):
        raise TypeError(
            f"{library} changed {block_name}.forward ({kind.name}): with identity "
            f"adapters the adapted forward st_adapter_fast mirrors from it no longer gives the same "
            f"output ({_max_difference(want, got)}), so adapters placed in it would train a different "
            f"model; check=False skips this check")


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
    fuse_layernorm: bool = False
    printed: bool = dataclasses.field(default=False, repr=False)  # verbose: a VideoClassifier prints too

    def __str__(self) -> str:
        pct = 100.0 * self.trainable_params / max(self.total_params, 1)
        blocks = (f"{self.block_indices[0]}-{self.block_indices[-1]}"
                  if self.block_indices == list(range(self.block_indices[0], self.block_indices[-1] + 1))
                  else ",".join(map(str, self.block_indices)))
        return (f"ST-Adapters: {len(self.adapters)} x {self.channels}->{self.adapter_channels} "
                f"kernel {self.kernel_size} ({'+'.join(self.positions)}) in {self.family} blocks {blocks}, "
                f"prefix tokens {self.num_prefix_tokens}, backend {self.backend!r}"
                f"{', LayerNorm fused' if self.fuse_layernorm else ''}; "
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


def _resolve_positions(positions) -> Tuple[str, ...]:
    if isinstance(positions, str):
        positions = (positions,)
    positions = tuple(positions)
    if not positions or any(p not in POSITIONS for p in positions) or len(set(positions)) != len(positions):
        raise ValueError(f"positions must be a non-empty subset of {POSITIONS}, got {positions}")
    return tuple(p for p in POSITIONS if p in positions)  # official order: pre_attn first


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
    if width > channels:
        # the official models narrow C=768 -> Ca=384; wider than C is allowed, but rarely meant
        warnings.warn(f"adapter_channels={width} is wider than the model ({channels} channels): the adapters "
                      f"widen instead of forming a bottleneck (the official models use Ca = C/2)", stacklevel=3)
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
    check: bool = True,
    verbose: bool = True,
    fuse_layernorm: bool = False,
) -> InjectionReport:
    """Insert STAdapters before attention and/or the MLP of a vision transformer's blocks.

    Args:
        model: a timm VisionTransformer or Eva; an open_clip or OpenAI clip VisionTransformer (or
            the CLIP model holding it as .visual); an HF transformers CLIPVisionModel,
            CLIPVisionModelWithProjection, CLIPModel, SiglipVisionModel, Dinov2Model or
            Dinov2WithRegistersModel; a st_adapter_fast CLIPVisionTransformer; or a
            VideoClassifier around any of them.
        adapter_channels: Ca, an int, or a float fraction of the model width (0.5 -> C/2).
            Wider than the model warns.
        kernel_size: depthwise conv kernel (kt, kh, kw) or kt; the official models use (3, 1, 1).
        positions: "pre_attn", "pre_mlp" or both ("24x384" = both, "12x384" = pre_mlp only).
        last_n_blocks: adapt the last n blocks (None = all; the official models adapt all);
        block_indices: or exactly these blocks (negative indices count from the end).
        backend: "auto" | "reference" | "triton" | "cuda", passed to every STAdapter.
        num_prefix_tokens: tokens before the patch grid left unchanged; None reads it from the
            model (timm: model.num_prefix_tokens, CLS + registers; open_clip, OpenAI clip, CLIP:
            1; SigLIP: 0; DINOv2: 1 + registers).
        freeze_backbone: set requires_grad=False on the vision transformer's own parameters
            (a VideoClassifier's head stays trainable); adapters are always trainable.
        check: for blocks whose forward is replaced (every library's), first run the library's
            block forward and the adapted one on a few random tokens with identity adapters and
            require equal outputs; a mismatch is a TypeError naming the library version. Costs
            one block forward on a copy of one block.
        verbose: print the report (trainable parameter counts).
        fuse_layernorm: run each adapter and the LayerNorm its output goes into (norm1 / ln_1,
            norm2 / ln_2) as one op (STAdapter.forward_layernorm): backward then saves x and
            per-token statistics instead of the adapter's input plus the LayerNorm's fp32 copy
            of its output (docs/design.md §7). Same outputs and gradients under the parity
            rule. Off by default until a GPU measurement shows it is no slower. Fused by the
            Triton backend (backend="cuda" raises); a LayerNorm class it does not replicate is
            a TypeError naming it.

    Adapters are created on the device and in the dtype of the block they join; a fresh adapter
    is the identity, so the model's outputs do not change until it trains. Returns an
    InjectionReport. Raises TypeError for unsupported models/blocks, ValueError for bad options
    or blocks that already hold an adapter at a requested position.
    """
    positions = _resolve_positions(positions)
    target, prefix = _find_target(model)
    indices = _resolve_blocks(len(target.blocks), last_n_blocks, block_indices)
    width = _resolve_width(adapter_channels, target.channels)
    if num_prefix_tokens is not None:
        if isinstance(num_prefix_tokens, bool) or not isinstance(num_prefix_tokens, numbers.Integral) \
                or num_prefix_tokens < 0:
            raise ValueError(f"num_prefix_tokens must be an int >= 0, got {num_prefix_tokens!r}")
        target.num_prefix_tokens = int(num_prefix_tokens)
    for i in indices:
        for pos in positions:
            if getattr(target.blocks[i], _ATTR[pos], None) is not None:
                raise ValueError(f"{prefix}{target.block_path}.{i} already has an {_ATTR[pos]}; "
                                 f"call remove_st_adapters(model) first")
    if not isinstance(fuse_layernorm, bool):
        raise TypeError(f"fuse_layernorm must be a bool, got {type(fuse_layernorm).__name__}")
    if fuse_layernorm:
        _check_fusable_norms(target, indices, positions, backend)
    if check and target.kind.adapted_forward is not None:
        self_check(target, target.blocks[indices[0]], positions)

    if freeze_backbone:
        # everything but a VideoClassifier's head: a whole CLIP model freezes its text tower too
        frozen = model.backbone if prefix.startswith("backbone.") else model
        for p in frozen.parameters():
            p.requires_grad_(False)

    added = _attach_adapters(target, indices, positions, width=width, kernel_size=kernel_size, backend=backend)
    for adapter in added.values():  # read by the adapted block forwards (families.base.adapter_and_norm)
        adapter.fuse_layernorm = fuse_layernorm
    names = [prefix + name for name in added]
    trainable, total = count_parameters(model)
    report = InjectionReport(
        family=target.family, adapters=names, block_indices=indices, positions=positions,
        channels=target.channels, adapter_channels=width, kernel_size=tuple(next(iter(added.values())).kernel_size),
        num_prefix_tokens=target.num_prefix_tokens, backend=backend, fuse_layernorm=fuse_layernorm,
        adapter_params=sum(p.numel() for a in added.values() for p in a.parameters()),
        trainable_params=trainable, total_params=total,
    )
    report.printed = bool(verbose)
    target.module.st_adapter_report = report  # read by VideoClassifier (it prints the head too)
    if verbose:
        print(report)
    return report


def _check_fusable_norms(target: Target, indices: Sequence[int], positions: Sequence[str], backend: str) -> None:
    """fuse_layernorm's preconditions: a backend that fuses the pair, and behind every slot a
    LayerNorm that the pair replicates (layernorm_rule)."""
    if backend == "cuda":
        raise ValueError("fuse_layernorm=True with backend='cuda': the CUDA backend does not fuse the LayerNorm "
                         "after the adapter; use backend='triton' or 'auto', or fuse_layernorm=False")
    for i in indices:
        for pos in positions:
            name = target.kind.norm_attrs[POSITIONS.index(pos)]
            norm = getattr(target.blocks[i], name, None)
            try:
                layernorm_rule(norm, target.channels)
            except TypeError as err:
                raise TypeError(f"{target.block_path}.{i}.{name}: {err}") from None


def _attach_adapters(target: Target, indices: Sequence[int], positions: Sequence[str], *,
                     width: int, kernel_size, backend: str) -> Dict[str, STAdapter]:
    """setattr an STAdapter into each slot, on each block's device and dtype, and give blocks
    without adapter slots of their own the adapted forward; returns {name in target.module: adapter}."""
    added = {}
    for i in indices:
        block = target.blocks[i]
        ref = next(block.parameters(), None)
        factory = dict(device=ref.device, dtype=ref.dtype) if ref is not None else {}
        for pos in POSITIONS:
            if pos in positions:
                adapter = STAdapter(target.channels, width, kernel_size, num_prefix_tokens=target.num_prefix_tokens,
                                    backend=backend, grid_size=target.grid_size, **factory)
                adapter.num_frames = None  # set per call by set_num_frames / VideoClassifier
                setattr(block, _ATTR[pos], adapter)
                added[f"{target.block_path}.{i}.{_ATTR[pos]}"] = adapter
            elif not hasattr(block, _ATTR[pos]):
                setattr(block, _ATTR[pos], None)  # the adapted forward reads both slots
        if target.kind.adapted_forward is not None:
            block.st_adapter_seq_first = target.seq_first
            block.forward = types.MethodType(target.kind.adapted_forward, block)
    return added


def remove_st_adapters(model: nn.Module) -> int:
    """Undo inject_st_adapters: drop every adapter and the patched forwards; returns how many
    adapters it removed. requires_grad flags are left as they are."""
    target, _ = _find_target(model)
    patched = target.kind.adapted_forward is not None
    removed = 0
    for block in target.blocks:
        for attr in _ATTR.values():
            if getattr(block, attr, None) is not None:
                removed += 1
            if attr in block._modules:
                del block._modules[attr]
            if patched and attr in block.__dict__:
                del block.__dict__[attr]
            if not patched:
                setattr(block, attr, None)  # our CLIP blocks keep their (empty) slots
        if "forward" in block.__dict__:
            del block.__dict__["forward"]
        block.__dict__.pop("st_adapter_seq_first", None)
    target.module.__dict__.pop("st_adapter_report", None)
    return removed
