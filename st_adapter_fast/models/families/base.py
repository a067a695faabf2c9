"""What every backbone family shares: the description of a found vision transformer (Target),
of a library block class whose forward we mirror (BlockKind), and the adapter call itself.

A family module (timm.py, open_clip.py, openai_clip.py, hf.py, builtin.py) exposes
``block_kinds()`` -- the BlockKinds of the libraries already imported (a model of theirs
exists only if they are) -- and ``describe(module, block_path, blocks, kind) -> Target``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import numbers
import sys
from typing import Callable, Optional, Sequence, Tuple

import torch
from torch import nn

__all__ = [
    "BlockKind", "Target", "adapter_num_frames", "check_num_frames", "run_adapter", "library_version",
    "square_or_none", "random_tokens", "match_kind", "block_width",
]


# ----------------------------------------------------------------------------- num_frames
def check_num_frames(num_frames) -> int:
    if isinstance(num_frames, bool) or not isinstance(num_frames, numbers.Integral):
        raise TypeError(f"num_frames must be an int, got {type(num_frames).__name__}")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    return int(num_frames)


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


def run_adapter(block: nn.Module, adapter: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """adapter(x) inside an adapted block forward. x: (N, L, C), or (L, N, C) in blocks that run
    sequence first (OpenAI clip, open_clip with batch_first=False) -- the adapter always sees
    (N, L, C) with N = B*T frames."""
    if getattr(block, "st_adapter_seq_first", False):
        return adapter(x.transpose(0, 1), adapter_num_frames(adapter)).transpose(0, 1)
    return adapter(x, adapter_num_frames(adapter))


# ------------------------------------------------------------------------ family descriptions
def _no_extra_args(target: "Target", block: nn.Module, x: torch.Tensor) -> Tuple[tuple, dict]:
    return (), {}


@dataclasses.dataclass(frozen=True)
class BlockKind:
    """A library block class whose forward inject_st_adapters replaces, per instance, by
    ``adapted_forward``: the same forward with the adapter slots called in between.

    check_args(target, block, x) gives the extra (args, kwargs) one call of the block needs in
    the self-check (rope tables, masks); x is the random token input.
    adapted_forward None: the block's own forward already calls the slots (our CLIP ViT)."""

    library: str  # the distribution whose version errors name ("timm", "transformers")
    block_class: type
    adapted_forward: Optional[Callable]
    channels_attr: str  # a LayerNorm of the block whose normalized_shape is the width C
    check_args: Callable = _no_extra_args

    @property
    def name(self) -> str:
        return f"{self.block_class.__module__}.{self.block_class.__qualname__}"


@dataclasses.dataclass
class Target:
    """A vision transformer found in a model, and how adapters go into its blocks.

    pool(module, frames, b, t) -> (B, D): the family's clip feature (frames (B*T, C, H, W),
    clip-major), the mean over frames of the model's own pooled frame feature; feature_dim: D.
    check_grid: the token grid (h, w) of the self-check input (the model's own where the block
    needs it, e.g. a rope table)."""

    family: str
    module: nn.Module
    block_path: str  # "blocks", "transformer.resblocks", "encoder.layers", relative to module
    blocks: Sequence[nn.Module]
    kind: BlockKind
    channels: int
    num_prefix_tokens: int
    grid_size: Optional[Tuple[int, int]]
    seq_first: bool = False
    pool: Optional[Callable] = None
    feature_dim: Optional[int] = None
    check_grid: Optional[Tuple[int, int]] = None  # None: grid_size, or 2 x 2


def match_kind(block: nn.Module, kinds: Sequence[BlockKind]) -> Optional[BlockKind]:
    """The kind whose class block is an instance of, with that class's forward (a subclass that
    overrides forward is a different block)."""
    for kind in kinds:
        if isinstance(block, kind.block_class) and type(block).forward is kind.block_class.forward:
            return kind
    return None


def block_width(kind: BlockKind, block: nn.Module) -> int:
    """The width C, read off the block's LayerNorm kind.channels_attr."""
    shape = getattr(getattr(block, kind.channels_attr, None), "normalized_shape", None)
    if not shape:
        raise TypeError(f"the installed {kind.library} {library_version(kind.library)} changed "
                        f"{kind.block_class.__qualname__}: it has no LayerNorm .{kind.channels_attr} to read "
                        f"the width from")
    return int(shape[0])


def square_or_none(grid) -> Optional[Tuple[int, int]]:
    """A grid the adapters are told about: None for square ones, which are inferred per call
    so that other square resolutions keep working."""
    if grid is None:
        return None
    if isinstance(grid, numbers.Integral):
        return None
    h, w = int(grid[0]), int(grid[1])
    return None if h == w else (h, w)


def random_tokens(target: Target, block: nn.Module, frames: int = 2) -> torch.Tensor:
    """Seeded random tokens (N, L, C) -- (L, N, C) for sequence-first blocks -- in the block's
    dtype and device, L = P + h*w of target.check_grid; the global RNG is left alone."""
    ref = next(block.parameters())
    h, w = target.check_grid or target.grid_size or (2, 2)
    length = target.num_prefix_tokens + h * w
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(frames, length, target.channels, generator=gen).to(ref.device, ref.dtype)
    return x.transpose(0, 1).contiguous() if target.seq_first else x


def library_version(library: str) -> str:
    """The installed version of a library, for error messages."""
    names = {"open_clip": ("open_clip_torch",), "clip": ("clip-anytorch", "openai-clip", "clip")}
    for dist in names.get(library, (library,)):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    module = sys.modules.get(library)
    return str(getattr(module, "__version__", "(version unknown)"))
