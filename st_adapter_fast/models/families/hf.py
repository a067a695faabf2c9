"""HF transformers image towers: CLIP (CLIPVisionModel, CLIPVisionModelWithProjection, a
CLIPModel's vision tower), SigLIP (no CLS token: P = 0), DINOv2 and DINOv2 with registers
(P = 1 + registers; layer scale and drop path in every layer).

Two layer forwards exist in the releases users have, and which one is installed is read off
the layer class's own signature, not guessed from a version number:
  * transformers 5.x: ``forward(hidden_states, attention_mask, **kwargs) -> Tensor``;
  * transformers 4.4x: ``forward(hidden_states, ..., output_attentions=False) -> tuple`` (the
    extra arguments -- attention_mask, causal_attention_mask, head_mask -- are passed on to the
    attention by name, as those releases do).
Clip features: the model's pooler_output (CLIP and DINOv2: CLS after the final norm; SigLIP:
its attention-pooling head, or the token mean after post_layernorm without one) averaged over
frames; feature_dim = config.hidden_size.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Dict, List, Optional

import torch
from torch import nn

from .base import BlockKind, Target, adapter_and_norm, block_width, match_kind

__all__ = ["match", "describe", "hf_pool"]

# (modeling module, layer class, structure): "clip" = layer_norm1/self_attn/layer_norm2/mlp,
# "dinov2" = norm1/attention/layer_scale1/drop_path/norm2/mlp/layer_scale2
_LAYERS = (
    ("transformers.models.clip.modeling_clip", "CLIPEncoderLayer", "clip"),
    ("transformers.models.siglip.modeling_siglip", "SiglipEncoderLayer", "clip"),
    ("transformers.models.dinov2.modeling_dinov2", "Dinov2Layer", "dinov2"),
    ("transformers.models.dinov2_with_registers.modeling_dinov2_with_registers",
     "Dinov2WithRegistersLayer", "dinov2"),
)


# ------------------------------------------------------------------ transformers 5.x layers
def _clip_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    # CLIPEncoderLayer / SiglipEncoderLayer.forward, transformers 5
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_attn, self.layer_norm1, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = residual + hidden_states
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.layer_norm2, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    return hidden_states


def _dinov2_layer_forward(self, hidden_states, attention_mask=None, **kwargs):
    # Dinov2Layer / Dinov2WithRegistersLayer.forward, transformers 5
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_attn, self.norm1, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states, _ = self.attention(hidden_states, attention_mask=attention_mask, **kwargs)
    hidden_states = self.layer_scale1(hidden_states)
    hidden_states = self.drop_path(hidden_states) + residual
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.norm2, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states = self.mlp(hidden_states)
    hidden_states = self.layer_scale2(hidden_states)
    hidden_states = self.drop_path(hidden_states) + residual
    return hidden_states


# ----------------------------------------------------------------- transformers 4.4x layers
@functools.lru_cache(maxsize=None)
def _signature(forward) -> inspect.Signature:
    return inspect.signature(forward)


def _other_arguments(self, hidden_states, args, kwargs) -> Dict[str, object]:
    """The layer call's arguments but hidden_states, by name (defaults filled in), as the 4.4x
    layers pass them on to their attention."""
    bound = _signature(type(self).forward).bind(self, hidden_states, *args, **kwargs)
    bound.apply_defaults()
    out = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        if i < 2:  # self, hidden_states
            continue
        kind = bound.signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            out[name] = value
    return out


def _clip_layer_forward_legacy(self, hidden_states, *args, **kwargs):
    # CLIPEncoderLayer / SiglipEncoderLayer.forward, transformers 4.4x
    attn_kwargs = _other_arguments(self, hidden_states, args, kwargs)
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_attn, self.layer_norm1, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states, attn_weights = self.self_attn(hidden_states=hidden_states, **attn_kwargs)
    hidden_states = residual + hidden_states
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.layer_norm2, hidden_states)
    residual = hidden_states
    hidden_states = normed
    hidden_states = self.mlp(hidden_states)
    hidden_states = residual + hidden_states
    outputs = (hidden_states,)
    if attn_kwargs.get("output_attentions", False):
        outputs += (attn_weights,)
    return outputs


def _dinov2_layer_forward_legacy(self, hidden_states, *args, **kwargs):
    # Dinov2Layer / Dinov2WithRegistersLayer.forward, transformers 4.4x
    attn_kwargs = _other_arguments(self, hidden_states, args, kwargs)
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_attn, self.norm1, hidden_states)
    self_attention_outputs = self.attention(normed, **attn_kwargs)
    attention_output = self.layer_scale1(self_attention_outputs[0])
    outputs = self_attention_outputs[1:]
    hidden_states = self.drop_path(attention_output) + hidden_states
    hidden_states, normed = adapter_and_norm(self, self.adapter_pre_mlp, self.norm2, hidden_states)
    layer_output = self.layer_scale2(self.mlp(normed))
    layer_output = self.drop_path(layer_output) + hidden_states
    return (layer_output,) + outputs


_FORWARDS = {
    ("clip", False): _clip_layer_forward, ("clip", True): _clip_layer_forward_legacy,
    ("dinov2", False): _dinov2_layer_forward, ("dinov2", True): _dinov2_layer_forward_legacy,
}
_NORM = {"clip": ("layer_norm1", "layer_norm2"), "dinov2": ("norm1", "norm2")}


def returns_tuple(layer_class: type) -> bool:
    """True for the 4.4x layers (they take output_attentions and return a tuple)."""
    return "output_attentions" in _signature(layer_class.forward).parameters


def _check_args(target: Target, block: nn.Module, x: torch.Tensor):
    """None for every argument the layer requires besides hidden_states (attention masks)."""
    params = list(_signature(type(block).forward).parameters.values())[2:]
    return (), {p.name: None for p in params
                if p.default is inspect.Parameter.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def block_kinds() -> List[BlockKind]:
    kinds = []
    for module_name, class_name, structure in _LAYERS:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None:
            forward = _FORWARDS[structure, returns_tuple(cls)]
            kinds.append(BlockKind("transformers", cls, forward, _NORM[structure][0], _check_args,
                                   norm_attrs=_NORM[structure]))
    return kinds


def match(block: nn.Module) -> Optional[BlockKind]:
    return match_kind(block, block_kinds())


# ----------------------------------------------------------------------------- the towers
def _prefix_tokens(module: nn.Module) -> int:
    """CLS (CLIP's class_embedding, DINOv2's cls_token) + DINOv2's register tokens; SigLIP 0."""
    emb = getattr(module, "embeddings", None)
    count = 1 if hasattr(emb, "class_embedding") or hasattr(emb, "cls_token") else 0
    registers = getattr(emb, "register_tokens", None)
    return count + (int(registers.shape[1]) if isinstance(registers, torch.Tensor) else 0)


def hf_pool(module: nn.Module, frames: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """pooler_output (or, where the model has no pooler, the mean of last_hidden_state over
    tokens) of frames (B*T, 3, H, W), averaged over frames -> (B, D)."""
    out = module(pixel_values=frames)
    if isinstance(out, tuple):
        last, pooled = out[0], (out[1] if len(out) > 1 else None)
    else:
        last, pooled = out.last_hidden_state, getattr(out, "pooler_output", None)
    if pooled is None:
        pooled = last.mean(dim=1)
    return pooled.reshape(b, t, -1).mean(dim=1)


def describe(module: nn.Module, block_path: str, blocks, kind: BlockKind) -> Target:
    config = getattr(module, "config", None)
    width = block_width(kind, blocks[0])
    return Target(
        "transformers", module, block_path, blocks, kind, channels=width,
        num_prefix_tokens=_prefix_tokens(module),
        grid_size=None,  # square patch grids, inferred per call (DINOv2 interpolates to any size)
        pool=hf_pool, feature_dim=int(getattr(config, "hidden_size", width)),
    )
