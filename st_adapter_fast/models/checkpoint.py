"""Adapter-only checkpoints, and official ST-Adapter checkpoints mapped onto any adapted model.

Like PEFT's ``get_peft_model_state_dict``: only what trains is saved -- every STAdapter's
parameters plus, by default, every other parameter with requires_grad (a VideoClassifier's
``fc`` head) -- under the model's own qualified names. A ViT-B/16 12x384 checkpoint is ~28 MB
instead of ~350 MB; the frozen backbone comes from its own weights file.

Official files (linziyi96/st-adapter utils.save_model) are ``torch.save({'model': state_dict,
'optimizer': ..., ...})`` where state_dict holds the trainable parameters:
``transformer.resblocks.{i}.adapter_pre_attn.{fc1,conv,fc2}.{weight,bias}``, ``..adapter_pre_mlp..``
and the head ``fc.weight`` / ``fc.bias``. :func:`map_official_state_dict` renames them by block
index and position onto whatever model holds the adapters (our CLIP ViT, timm ``blocks.{i}``,
open_clip ``transformer.resblocks.{i}``) and reports what is missing or left over.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .inject import iter_st_adapters

__all__ = [
    "adapter_state_dict", "load_adapter_state_dict", "save_adapters", "load_adapters",
    "map_official_state_dict", "load_official_checkpoint", "CheckpointReport",
]

FORMAT_KEY = "st_adapter_fast"  # metadata entry next to 'model' in our files


@dataclasses.dataclass
class CheckpointReport:
    """missing: trainable (adapter / head) keys of the model the file did not fill; unexpected:
    file keys with no place in the model; mismatched: same key, different shape (never loaded)."""

    loaded: List[str]
    missing_keys: List[str]
    unexpected_keys: List[str]
    mismatched_keys: List[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        def short(keys):
            return "[" + ", ".join(keys[:4]) + (f", ... {len(keys)} in all" if len(keys) > 4 else "") + "]"

        return (f"loaded {len(self.loaded)} tensors; missing {len(self.missing_keys)} {short(self.missing_keys)}; "
                f"unexpected {len(self.unexpected_keys)} {short(self.unexpected_keys)}; "
                f"mismatched {len(self.mismatched_keys)} {short(self.mismatched_keys)}")


def _adapter_param_names(model: nn.Module) -> List[str]:
    names = []
    for module_name, adapter in iter_st_adapters(model):
        names += [f"{module_name}.{n}" for n, _ in adapter.named_parameters()]
    return names


def _trainable_names(model: nn.Module, include_trainable: bool) -> List[str]:
    names = _adapter_param_names(model)
    if include_trainable:
        seen = set(names)
        names += [n for n, p in model.named_parameters() if p.requires_grad and n not in seen]
    return names


def adapter_state_dict(model: nn.Module, *, include_trainable: bool = True) -> Dict[str, torch.Tensor]:
    """Every STAdapter's parameters (and, with include_trainable, every other parameter that
    requires grad, e.g. the head) under the model's qualified names, detached."""
    params = dict(model.named_parameters())
    return {n: params[n].detach() for n in _trainable_names(model, include_trainable)}


def load_adapter_state_dict(
    model: nn.Module, state: Mapping[str, torch.Tensor], *, strict: bool = True,
    include_trainable: bool = True,
) -> CheckpointReport:
    """Copy an adapter-only state dict into model (cast to each parameter's dtype/device).

    strict: raise ValueError unless every adapter (and trainable) parameter is filled and the
    file has no other keys. Shape mismatches always raise."""
    params = dict(model.named_parameters())
    wanted = _trainable_names(model, include_trainable)
    loaded, unexpected, mismatched = [], [], []
    for key, value in state.items():
        if key not in params:
            unexpected.append(key)
        elif tuple(params[key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(params[key].shape)}")
    if mismatched:
        raise ValueError("checkpoint shapes do not fit the model:\n  " + "\n  ".join(mismatched[:8]))
    missing = [k for k in wanted if k not in state]
    report = CheckpointReport(loaded=[], missing_keys=missing, unexpected_keys=unexpected)
    if strict and not report.ok:
        raise ValueError(f"adapter checkpoint does not match the model: {report}")
    with torch.no_grad():
        for key, value in state.items():
            if key in params:
                params[key].copy_(value)
                loaded.append(key)
    report.loaded = loaded
    return report


def save_adapters(model: nn.Module, path: Union[str, os.PathLike], *, include_trainable: bool = True, **extra) -> Dict:
    """torch.save({'model': adapter_state_dict(model), 'st_adapter_fast': {...}, **extra}, path).

    The 'model' entry follows the official files' layout; extra entries (optimizer state, epoch)
    are stored as given. Returns the saved dict."""
    adapters = list(iter_st_adapters(model))
    meta = {
        "version": 1,
        "adapters": {name: {"in_channels": a.fc1.in_features, "adapter_channels": a.fc1.out_features,
                            "kernel_size": tuple(a.kernel_size), "num_prefix_tokens": a.num_prefix_tokens}
                     for name, a in adapters},
    }
    payload = {"model": {k: v.cpu() for k, v in adapter_state_dict(model, include_trainable=include_trainable).items()},
               FORMAT_KEY: meta, **extra}
    torch.save(payload, os.fspath(path))
    return payload


def _read_checkpoint(source) -> Dict[str, torch.Tensor]:
    if isinstance(source, Mapping):
        state = source
    else:
        try:
            state = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        except Exception as err:
            # never unpickle arbitrary objects on the caller's behalf
            raise ValueError(
                f"{os.fspath(source)!r} does not load with torch.load(weights_only=True) ({err}); if you "
                f"trust the file, load it yourself and pass the dict (or its 'model' entry)") from None
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict or a dict with a 'model' entry, got {type(state).__name__}")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_adapters(model: nn.Module, source, *, strict: bool = True, include_trainable: bool = True) -> CheckpointReport:
    """Load a file written by save_adapters (or any {'model': state_dict} / bare state dict)."""
    return load_adapter_state_dict(model, _read_checkpoint(source), strict=strict, include_trainable=include_trainable)


# ---------------------------------------------------------------------- official checkpoints
_OFFICIAL_ADAPTER = re.compile(
    r"^transformer\.resblocks\.(\d+)\.(adapter_pre_attn|adapter_pre_mlp)\.(fc1|conv|fc2)\.(weight|bias)$")
_OFFICIAL_HEAD = re.compile(r"^fc\.(weight|bias)$")


def _adapter_slots(model: nn.Module) -> Dict[Tuple[int, str], str]:
    """{(block index, 'adapter_pre_attn'|'adapter_pre_mlp'): qualified adapter name} for model."""
    slots = {}
    for name, _ in iter_st_adapters(model):
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] in ("adapter_pre_attn", "adapter_pre_mlp") and parts[-2].isdigit():
            key = (int(parts[-2]), parts[-1])
            if key in slots:
                raise ValueError(f"two adapters claim block {key[0]} {key[1]}: {slots[key]} and {name}")
            slots[key] = name
    return slots


def _head_prefix(model: nn.Module) -> Optional[str]:
    fc = getattr(model, "fc", None)
    return "fc." if isinstance(fc, nn.Linear) else None


def map_official_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module,
) -> Tuple[Dict[str, torch.Tensor], CheckpointReport]:
    """Rename an official ST-Adapter state dict onto model's adapters and head.

    ``transformer.resblocks.{i}.adapter_pre_mlp.fc1.weight`` goes to the adapter at block i,
    position pre_mlp, wherever model keeps it; ``fc.*`` to model.fc (a VideoClassifier's head).
    Returns (mapped state dict, report): missing = model adapter/head keys the file lacks,
    unexpected = file keys with no place in model (e.g. an adapter for a block the model left
    without one, or backbone weights), mismatched = shapes that differ (left out of the result).
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    slots = _adapter_slots(model)
    head = _head_prefix(model)
    params = dict(model.named_parameters())
    mapped, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        m = _OFFICIAL_ADAPTER.match(key)
        target = None
        if m is not None:
            slot = slots.get((int(m.group(1)), m.group(2)))
            if slot is not None:
                target = f"{slot}.{m.group(3)}.{m.group(4)}"
        elif head is not None and _OFFICIAL_HEAD.match(key):
            target = head + key[len("fc."):]
        if target is None or target not in params:
            unexpected.append(key)
        elif tuple(params[target].shape) != tuple(value.shape):
            mismatched.append(f"{key} -> {target}: file {tuple(value.shape)} vs model {tuple(params[target].shape)}")
        else:
            mapped[target] = value
    wanted = _adapter_param_names(model) + ([head + "weight", head + "bias"] if head else [])
    missing = [k for k in wanted if k not in mapped]
    return mapped, CheckpointReport(loaded=sorted(mapped), missing_keys=missing,
                                    unexpected_keys=unexpected, mismatched_keys=mismatched)


def load_official_checkpoint(model: nn.Module, source, *, strict: bool = True) -> CheckpointReport:
    """Load an official ST-Adapter checkpoint (file path or dict; its 'model' entry) into model's
    adapters and head. strict: raise ValueError (with the report) unless every key maps and
    every adapter/head parameter is filled; otherwise load what maps and return the report."""
    mapped, report = map_official_state_dict(_read_checkpoint(source), model)
    if strict and not report.ok:
        raise ValueError(f"official checkpoint does not match the model: {report}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in mapped.items():
            params[key].copy_(value)
    return report
