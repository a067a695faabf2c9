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
    "square_or_none", "random_tokens", "match_kind", "block_width", "adapter_and_norm", "layernorm_rule",
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


def adapter_and_norm(block: nn.Module, adapter: Optional[nn.Module], norm: nn.Module,
                     x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x', norm(x')) with x' = adapter(x) (x itself without an adapter): the adapter slot and the
    LayerNorm right after it in an adapted block forward. Where injection fused them
    (inject_st_adapters(..., fuse_layernorm=True) sets adapter.fuse_layernorm) one op
    computes both (STAdapter.forward_layernorm, docs/design.md §7)."""
    if adapter is None:
        return x, norm(x)
    if not getattr(adapter, "fuse_layernorm", False):
        x = run_adapter(block, adapter, x)
        return x, norm(x)
    seq_first = getattr(block, "st_adapter_seq_first", False)
    tokens = x.transpose(0, 1) if seq_first else x
    out, normed = adapter.forward_layernorm(tokens, adapter_num_frames(adapter), norm)
    return (out.transpose(0, 1), normed.transpose(0, 1)) if seq_first else (out, normed)


# LayerNorm classes the fused pair replicates, by (module, qualname): "input" = fp32 compute,
# result cast back to the input's dtype (CLIP's, open_clip's); "torch" = F.layer_norm as is
# (fp32 result under autocast, else the input's dtype)
_LAYERNORMS = {
    ("torch.nn.modules.normalization", "LayerNorm"): "torch",
    ("timm.layers.norm", "LayerNorm"): "torch",  # unless timm's fast-norm mode is on
    ("open_clip.transformer", "LayerNorm"): "input",
    ("open_clip.transformer", "LayerNormFp32"): "input",
    ("clip.model", "LayerNorm"): "input",
    ("st_adapter_fast.models.clip_vit", "LayerNorm"): "input",
}


def layernorm_rule(norm: nn.Module, channels: int) -> str:
    """'input' or 'torch' (see _LAYERNORMS) for a LayerNorm the adapter + LayerNorm pair can
    replace; TypeError naming the class otherwise (another norm, timm's fast norm, a LayerNorm
    over other than the last dim of width ``channels``)."""
    key = (type(norm).__module__, type(norm).__qualname__)
    rule = _LAYERNORMS.get(key)
    shape = tuple(getattr(norm, "normalized_shape", ()))
    why = None
    if rule is None:
        why = f"a {key[0]}.{key[1]}, not one of the LayerNorms the fused pair replicates " \
              f"({', '.join(f'{m}.{q}' for m, q in _LAYERNORMS)})"
    elif getattr(norm, "_fast_norm", False):
        why = "timm's LayerNorm in fast-norm mode (timm.layers.set_fast_norm), which computes in low precision"
    elif shape != (channels,):
        why = f"a LayerNorm over {shape}, expected ({channels},)"
    if why is not None:
        raise TypeError(f"fuse_layernorm=True: the norm after the adapter is {why}; pass fuse_layernorm=False")
    return rule


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
    # the LayerNorm each slot's output goes into (pre_attn, pre_mlp): what fuse_layernorm fuses
    norm_attrs: Tuple[str, str] = ("norm1", "norm2")

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
