"""The switches of the field's ST-Adapter variants (docs/design.md §9), as one descriptor.

``Variant`` names what a call does beyond the official module: a LayerNorm before fc1, an
activation after fc1 and/or after the conv, prefix tokens through the MLP, a learnable scalar
on the branch, DropPath. The reference computes every combination (st_adapter_fast.reference);
dispatch hands the descriptor to each backend's ``unavailable_reason`` so a backend that fuses
only some switches can say which one it lacks. Only torch-free code here: backends import it.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import List, Optional

__all__ = ["Variant", "OFFICIAL", "NORMS", "ACTIVATIONS", "PREFIX_MODES"]

NORMS = (None, "layernorm")
# "gelu" is the erf GELU (nn.GELU()); "quick_gelu" is CLIP's t * sigmoid(1.702 t)
ACTIVATIONS = (None, "gelu", "quick_gelu", "relu")
PREFIX_MODES = ("skip", "mlp")


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class Variant:
    """What one call computes beyond the official adapter (defaults: the official module).

    norm: None | "layernorm" (over C, eps 1e-5 in STAdapter, own affine).
    act_after_fc1, act_after_conv: None | "gelu" | "quick_gelu" | "relu".
    prefix_mode: "skip" (prefix tokens pass through) | "mlp" (fc1 -> acts -> fc2, no conv).
    scale: whether a learnable scalar multiplies the branch.
    drop_path: the DropPath probability *in effect* for this call (0 in eval mode).
    """

    norm: Optional[str] = None
    act_after_fc1: Optional[str] = None
    act_after_conv: Optional[str] = None
    prefix_mode: str = "skip"
    scale: bool = False
    drop_path: float = 0.0

    def __post_init__(self):
        _check_choice("norm", self.norm, NORMS)
        _check_choice("act_after_fc1", self.act_after_fc1, ACTIVATIONS)
        _check_choice("act_after_conv", self.act_after_conv, ACTIVATIONS)
        _check_choice("prefix_mode", self.prefix_mode, PREFIX_MODES)
        check_drop_path(self.drop_path)

    @property
    def official(self) -> bool:
        return not self.switches()

    def switches(self) -> List[str]:
        """The non-official switches of this call, e.g. ["norm='layernorm'", "scale"]."""
        out = []
        for field in ("norm", "act_after_fc1", "act_after_conv"):
            value = getattr(self, field)
            if value is not None:
                out.append(f"{field}={value!r}")
        if self.prefix_mode != "skip":
            out.append(f"prefix_mode={self.prefix_mode!r}")
        if self.scale:
            out.append("scale")
        if self.drop_path > 0:
            out.append(f"drop_path={self.drop_path:g} (training)")
        return out

    def describe(self) -> str:
        return ", ".join(self.switches()) or "the official switches"

    def short(self) -> str:
        """A compact tag for case labels: 'ln-fc1gelu-convrelu-mlp-s-dp0.1' ('' if official)."""
        parts = []
        if self.norm:
            parts.append("ln")
        if self.act_after_fc1:
            parts.append(f"fc1{self.act_after_fc1.replace('_', '')}")
        if self.act_after_conv:
            parts.append(f"conv{self.act_after_conv.replace('_', '')}")
        if self.prefix_mode == "mlp":
            parts.append("mlp")
        if self.scale:
            parts.append("s")
        if self.drop_path > 0:
            parts.append(f"dp{self.drop_path:g}")
        return "-".join(parts)


def check_drop_path(p) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"drop_path must be a probability in [0, 1), got {p!r}")
    return float(p)


OFFICIAL = Variant()
