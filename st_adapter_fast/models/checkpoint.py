"""Adapter-only checkpoints, and official ST-Adapter checkpoints mapped onto any adapted model.

Like PEFT's ``get_peft_model_state_dict``: only what trains is saved -- every STAdapter's
parameters plus, by default, every other parameter with requires_grad (a VideoClassifier's
``fc`` head). A ViT-B/16 12x384 checkpoint is ~28 MB instead of ~350 MB; the frozen backbone
comes from its own weights file.

File format (version 2), ``torch.save`` of::

    {"model": {key: tensor},            # keys relative to the vision transformer ...
     "st_adapter_fast": {"version": 2,
                         "outside": [...],   # ... except these, relative to the model saved
                         "vit_prefix": "backbone.",
                         "adapters": {name: {block, position, in_channels, adapter_channels,
                                             kernel_size, num_prefix_tokens, backend}}},
     **extra}                           # optimizer=, epoch=, ... as given to save_adapters

"Relative to the vision transformer" means relative to the module inject_st_adapters puts the
adapters in (a VideoClassifier's ``backbone``, an open_clip CLIP's ``visual``, or the bare ViT),
so a file saved from a VideoClassifier loads into the bare ViT and the other way round. For our
CLIP ViT the keys are the official ones (``transformer.resblocks.{i}.adapter_pre_mlp.fc1.weight``,
head ``fc.weight``). ``load_adapters(model, path, inject=True)`` re-creates the adapters the
file describes in a plain model (PEFT's ``PeftModel.from_pretrained``), then loads them.
Version 1 files (model-qualified keys) still load into the kind of model that saved them, and
into the bare ViT / a VideoClassifier around it.

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
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from . import inject as _inject
from .inject import iter_st_adapters

__all__ = [
    "adapter_state_dict", "load_adapter_state_dict", "save_adapters", "load_adapters",
    "map_official_state_dict", "load_official_checkpoint", "CheckpointReport",
    "map_mmaction_state_dict", "load_mmaction_checkpoint", "MMACTION2_SWITCHES",
]

FORMAT_KEY = "st_adapter_fast"  # metadata entry next to 'model' in our files
FORMAT_VERSION = 2  # 2: keys relative to the vision transformer, injection settings stored
_POSITION_OF = {"adapter_pre_attn": "pre_attn", "adapter_pre_mlp": "pre_mlp"}
# where older files (model-qualified keys) may have held the vision transformer
_V1_WRAPPERS = ("backbone.visual.", "backbone.", "visual.")


@dataclasses.dataclass
class CheckpointReport:
    """missing: trainable (adapter / head) keys of the model the file did not fill; unexpected:
    file keys with no place in the model; mismatched: same key, different shape (never loaded)."""

    loaded: List[str]
    missing_keys: List[str]
    unexpected_keys: List[str]
    mismatched_keys: List[str] = dataclasses.field(default_factory=list)
    # load_adapters only. skipped: entries outside the vision transformer (a head) that only one
    # side has -- a VideoClassifier's fc loading into a bare ViT, or the other way round (the
    # model's own is left as it is); they never make a load fail.
    skipped_keys: List[str] = dataclasses.field(default_factory=list)
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the file's other entries (epoch=, ...)
    injected: List[str] = dataclasses.field(default_factory=list)  # adapters inject=True created

    @property
    def ok(self) -> bool:
        return not (self.missing_keys or self.unexpected_keys or self.mismatched_keys)

    def __str__(self) -> str:
        def short(keys):
            return "[" + ", ".join(keys[:4]) + (f", ... {len(keys)} in all" if len(keys) > 4 else "") + "]"

        text = (f"loaded {len(self.loaded)} tensors; missing {len(self.missing_keys)} {short(self.missing_keys)}; "
                f"unexpected {len(self.unexpected_keys)} {short(self.unexpected_keys)}; "
                f"mismatched {len(self.mismatched_keys)} {short(self.mismatched_keys)}")
        if self.skipped_keys:
            text += f"; skipped {len(self.skipped_keys)} {short(self.skipped_keys)}"
        return text


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
    """Copy an adapter-only state dict, keyed by model's qualified names (what adapter_state_dict
    returns), into model (cast to each parameter's dtype/device).

    strict: raise ValueError unless every adapter (and trainable) parameter is filled and the
    file has no other keys. Shape mismatches always raise."""
    return _copy_into(model, state, _trainable_names(model, include_trainable), strict=strict)


def _copy_into(model: nn.Module, state: Mapping[str, torch.Tensor], wanted: List[str], *, strict: bool,
               skipped: Optional[List[str]] = None) -> CheckpointReport:
    params = dict(model.named_parameters())
    loaded, unexpected, mismatched = [], [], []
    for key, value in state.items():
        if key not in params:
            unexpected.append(key)
        elif tuple(params[key].shape) != tuple(value.shape):
            mismatched.append(f"{key}: file {tuple(value.shape)} vs model {tuple(params[key].shape)}")
    if mismatched:
        raise ValueError("checkpoint shapes do not fit the model:\n  " + "\n  ".join(mismatched[:8]))
    missing = [k for k in wanted if k not in state]
    report = CheckpointReport(loaded=[], missing_keys=missing, unexpected_keys=unexpected,
                              skipped_keys=list(skipped or []))
    if strict and not report.ok:
        raise ValueError(f"adapter checkpoint does not match the model: {report}")
    with torch.no_grad():
        for key, value in state.items():
            if key in params:
                params[key].copy_(value)
                loaded.append(key)
    report.loaded = loaded
    return report


def _vit_prefix(model: nn.Module) -> str:
    """Qualified-name prefix, within model, of the module that holds the adapters ("backbone.",
    "visual.", "" for the bare ViT): inject_st_adapters' own target finder decides."""
    return _inject._find_target(model)[1]


def _slot(name: str) -> Tuple[Optional[int], Optional[str]]:
    """(block index, position) of an adapter named like 'blocks.3.adapter_pre_mlp', else (None, None)."""
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] in _POSITION_OF and parts[-2].isdigit():
        return int(parts[-2]), _POSITION_OF[parts[-1]]
    return None, None


def _switches_of(adapter) -> Dict[str, Any]:
    """An adapter's docs/design.md §9 switches as plain values ({} for the official module)."""
    out = {"norm": "layernorm" if getattr(adapter, "norm", None) is not None else None,
           "act_after_fc1": getattr(adapter, "act_after_fc1", None),
           "act_after_conv": getattr(adapter, "act_after_conv", None),
           "prefix_mode": getattr(adapter, "prefix_mode", "skip"),
           "scale": getattr(adapter, "scale", None) is not None,
           "drop_path": float(getattr(adapter, "drop_path", 0.0))}
    defaults = {"norm": None, "act_after_fc1": None, "act_after_conv": None, "prefix_mode": "skip",
                "scale": False, "drop_path": 0.0}
    return {k: v for k, v in out.items() if v != defaults[k]}


def save_adapters(model: nn.Module, path: Union[str, os.PathLike], *, include_trainable: bool = True, **extra) -> Dict:
    """torch.save({'model': adapters (+ head), 'st_adapter_fast': settings, **extra}, path).

    Keys are relative to the vision transformer (see the module docstring), so the file loads
    into a VideoClassifier or the bare ViT alike; the settings of every adapter (block, position,
    widths, kernel, prefix tokens) let ``load_adapters(..., inject=True)`` rebuild them. Extra
    entries (optimizer state, epoch) are stored as given and come back as ``report.extra``.
    Returns the saved dict."""
    reserved = {"model", FORMAT_KEY} & set(extra)
    if reserved:
        raise ValueError(f"extra entries may not be named {sorted(reserved)}: save_adapters writes those")
    prefix = _vit_prefix(model)
    adapters = {}
    for name, a in iter_st_adapters(model):
        rel = name[len(prefix):] if name.startswith(prefix) else name
        block, position = _slot(rel)
        adapters[rel] = {"block": block, "position": position, "in_channels": a.fc1.in_features,
                         "adapter_channels": a.fc1.out_features, "kernel_size": tuple(a.kernel_size),
                         "num_prefix_tokens": a.num_prefix_tokens, "backend": a.backend,
                         "switches": _switches_of(a)}
    state, outside = {}, []
    for key, value in adapter_state_dict(model, include_trainable=include_trainable).items():
        if key.startswith(prefix):
            key = key[len(prefix):]
        else:
            outside.append(key)  # e.g. a VideoClassifier's head 'fc.weight'
        state[key] = value.cpu()
    meta = {"version": FORMAT_VERSION, "vit_prefix": prefix, "outside": outside, "adapters": adapters}
    payload = {"model": state, FORMAT_KEY: meta, **extra}
    torch.save(payload, os.fspath(path))
    return payload


def _read_payload(source) -> Tuple[Dict[str, torch.Tensor], Optional[Mapping], Dict[str, Any]]:
    """(state dict, our metadata or None, the other top-level entries) of a file path or dict."""
    if isinstance(source, Mapping):
        payload = source
    else:
        try:
            payload = torch.load(os.fspath(source), map_location="cpu", weights_only=True)
        except Exception as err:
            # never unpickle arbitrary objects on the caller's behalf
            raise ValueError(
                f"{os.fspath(source)!r} does not load with torch.load(weights_only=True) ({err}); if you "
                f"trust the file, load it yourself and pass the dict (or its 'model' entry)") from None
    meta, extra, state = None, {}, payload
    if isinstance(payload, Mapping) and "model" in payload and isinstance(payload["model"], Mapping):
        state = payload["model"]
        meta = payload.get(FORMAT_KEY)
        extra = {k: v for k, v in payload.items() if k not in ("model", FORMAT_KEY)}
    if not isinstance(state, Mapping):
        raise TypeError(f"expected a state dict or a dict with a 'model' entry, got {type(state).__name__}")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    return state, meta, extra


def _read_checkpoint(source) -> Dict[str, torch.Tensor]:
    return _read_payload(source)[0]


def _to_model_keys(state: Mapping[str, torch.Tensor], meta: Optional[Mapping], model: nn.Module
                   ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """File keys -> model's qualified names; returns (renamed state, file keys outside the vision
    transformer that model has no parameter for)."""
    prefix = _vit_prefix(model)
    params = dict(model.named_parameters())
    out, skipped = {}, []
    if meta is not None and int(meta.get("version", 1)) >= 2:
        outside = set(meta.get("outside", ()))
        for key, value in state.items():
            if key in outside:
                if key in params:
                    out[key] = value
                else:
                    skipped.append(key)
            else:
                out[prefix + key] = value
        return out, skipped
    # version 1 / a bare state dict: model-qualified keys of whatever model saved them
    for key, value in state.items():
        candidates = [key, prefix + key] + [prefix + key[len(w):] for w in _V1_WRAPPERS if key.startswith(w)]
        out[next((c for c in candidates if c in params), key)] = value
    return out, skipped


def _inject_from_file(model: nn.Module, meta: Optional[Mapping], backend: str, fuse_layernorm: bool) -> List[str]:
    """inject_st_adapters(model, ...) with the settings the file stores; returns the new names."""
    if meta is None or not meta.get("adapters"):
        raise ValueError("inject=True: the file has no adapter settings (it was not written by save_adapters); "
                         "call inject_st_adapters(model, ...) with the original settings, then load_adapters "
                         "without inject=True")
    present = [name for name, _ in iter_st_adapters(model)]
    if present:
        raise ValueError(f"inject=True: the model already has {len(present)} ST-Adapters ({present[0]}, ...); "
                         f"load without inject=True, or remove_st_adapters(model) first")
    groups: Dict[Tuple, List[int]] = {}
    for name, cfg in meta["adapters"].items():
        if cfg.get("switches"):
            # inject_st_adapters builds official adapters only: rebuilding these would lose
            # switches that have no parameters (activations, prefix_mode) without an error
            raise ValueError(f"inject=True: adapter {name!r} was saved with variant switches {cfg['switches']} "
                             f"that inject_st_adapters cannot rebuild yet; build the adapters by hand, then "
                             f"load without inject=True")
        block, position = cfg.get("block"), cfg.get("position")
        if block is None or position is None:  # version 1 files: read it off the name
            block, position = _slot(name)
        if block is None:
            raise ValueError(f"inject=True: cannot tell the block and position of adapter {name!r}; "
                             f"inject the adapters by hand, then load without inject=True")
        key = (position, int(cfg["adapter_channels"]), tuple(cfg["kernel_size"]), int(cfg["num_prefix_tokens"]))
        groups.setdefault(key, []).append(int(block))
    names = []
    for (position, channels, kernel_size, prefix_tokens), blocks in groups.items():
        report = _inject.inject_st_adapters(
            model, adapter_channels=channels, kernel_size=kernel_size, positions=(position,),
            block_indices=sorted(blocks), num_prefix_tokens=prefix_tokens, backend=backend,
            fuse_layernorm=fuse_layernorm, verbose=False)
        names += report.adapters
    return names


def load_adapters(model: nn.Module, source, *, strict: bool = True, include_trainable: bool = True,
                  inject: bool = False, backend: str = "auto", fuse_layernorm: bool = False) -> CheckpointReport:
    """Load a file written by save_adapters (or any {'model': state_dict} / bare state dict).

    Args:
        model: the model to fill: a VideoClassifier, or the bare vision transformer, whichever
            the file was saved from (keys are relative to the vision transformer).
        source: a path, or the dict torch.load returns.
        strict: raise ValueError (with the report) unless every adapter parameter of model and
            every adapter entry of the file meet. A head only one side has is skipped, not an
            error (``report.skipped_keys``); shape mismatches always raise.
        include_trainable: also expect the model's other trainable parameters (the head).
        inject: first inject_st_adapters into model as the file describes (block, position,
            widths, kernel, prefix tokens of every adapter), as PEFT's from_pretrained does; model
            must have no adapters yet. Freezes the backbone like inject_st_adapters.
        backend: for the adapters inject=True creates ("auto": the fastest available here; the
            backend the file was saved with is recorded but may not exist on this machine).
        fuse_layernorm: for the adapters inject=True creates, as inject_st_adapters takes it
            (a runtime choice: files do not record it).
    Returns a CheckpointReport; ``report.extra`` holds the file's other entries (optimizer=,
    epoch=, ...) and ``report.injected`` the adapters inject=True created.
    """
    state, meta, extra = _read_payload(source)
    injected = _inject_from_file(model, meta, backend, fuse_layernorm) if inject else []
    try:
        mapped, skipped = _to_model_keys(state, meta, model)
        wanted = _trainable_names(model, include_trainable)
        prefix = _vit_prefix(model)
        # the model's trainable parameters outside the vision transformer (a head) the file lacks
        skipped += [k for k in wanted if not k.startswith(prefix) and k not in mapped]
        wanted = [k for k in wanted if k not in skipped]
        report = _copy_into(model, mapped, wanted, strict=strict, skipped=skipped)
    except Exception:
        if injected:
            _inject.remove_st_adapters(model)  # leave no half-loaded adapters behind
        raise
    report.extra, report.injected = extra, injected
    return report


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



def _place(key: str, target: Optional[str], value: torch.Tensor, params: Dict[str, torch.Tensor],
           mapped: Dict[str, torch.Tensor], unexpected: List[str], mismatched: List[str]) -> None:
    """File entry `key` goes to model parameter `target` (None: nowhere), or is reported."""
    if target is None or target not in params:
        unexpected.append(key)
    elif tuple(params[target].shape) != tuple(value.shape):
        mismatched.append(f"{key} -> {target}: file {tuple(value.shape)} vs model {tuple(params[target].shape)}")
    else:
        mapped[target] = value


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
        _place(key, target, value, params, mapped, unexpected, mismatched)
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


# --------------------------------------------------------------------- MMAction2 checkpoints
# MMAction2's STAdapter (mmaction/models/multimodal/vindlu/temporal_model.py, used by its
# ViT-CLIP / VindLU backbones): linear1 -> depthwise conv (3, 3, 3) on the patch tokens, CLS
# without it -> ReLU -> linear2, out = x + scale * DropPath(.), scale a 0-dim zero-init
# Parameter. Our STAdapter with MMACTION2_SWITCHES computes the same (docs/design.md §9).
_MMACTION_ADAPTER = re.compile(r"^(?:(?P<path>.*)\.)?(?P<leaf>linear1|conv|linear2)\.(?P<kind>weight|bias)$")
_MMACTION_SCALE = re.compile(r"^(?:(?P<path>.*)\.)?scale$")
_MMACTION_LEAF = {"linear1": "fc1", "conv": "conv", "linear2": "fc2"}
MMACTION2_SWITCHES = dict(act_after_conv="relu", prefix_mode="mlp", scale=0.0, drop_path=0.1)


def _mmaction_switch_mismatch(adapter) -> List[str]:
    """How an STAdapter's switches differ from MMAction2's forward (drop_path, a training-time
    regulariser, may differ)."""
    want = {"norm": None, "act_after_fc1": None, "act_after_conv": "relu", "prefix_mode": "mlp"}
    have = {"norm": "layernorm" if adapter.norm is not None else None, "act_after_fc1": adapter.act_after_fc1,
            "act_after_conv": adapter.act_after_conv, "prefix_mode": adapter.prefix_mode}
    out = [f"{k}={have[k]!r} (MMAction2: {v!r})" for k, v in want.items() if have[k] != v]
    if adapter.scale is None:
        out.append("no scale (MMAction2 has one)")
    return out


def map_mmaction_state_dict(
    state: Mapping[str, torch.Tensor], model: nn.Module, *, module_map=None,
) -> Tuple[Dict[str, torch.Tensor], CheckpointReport]:
    """Rename MMAction2 STAdapter keys onto model's STAdapters.

    ``{path}.linear1.{weight,bias}`` -> ``{path'}.fc1.*``, ``{path}.conv.*`` -> ``{path'}.conv.*``,
    ``{path}.linear2.*`` -> ``{path'}.fc2.*``, ``{path}.scale`` -> ``{path'}.scale``, where path'
    is ``module_map(path)`` (a callable, or a dict of file prefix -> model prefix, longest first;
    default: the same path) and must name an STAdapter of model ("" when model is one). Keys
    without an STAdapter at path' are unexpected (a whole MMAction2 checkpoint's backbone
    weights, or a ``scale`` for an adapter built without ``scale=``); missing = model adapter
    parameters the file did not fill; mismatched = same place, other shape (not loaded).
    """
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    adapters = dict(iter_st_adapters(model))
    params = dict(model.named_parameters())

    def to_model_path(path: str) -> Optional[str]:
        if module_map is None:
            return path
        if callable(module_map):
            return module_map(path)
        for src in sorted(module_map, key=len, reverse=True):
            if path == src or path.startswith(src + ".") or src == "":
                rest = path[len(src):].lstrip(".")
                dst = module_map[src]
                return ".".join(p for p in (dst, rest) if p)
        return path

    def join(*parts: str) -> str:
        return ".".join(p for p in parts if p)

    mapped, unexpected, mismatched = {}, [], []
    for key, value in state.items():
        m = _MMACTION_ADAPTER.match(key)
        s = _MMACTION_SCALE.match(key) if m is None else None
        target = None
        if m is not None or s is not None:
            path = to_model_path((m or s).group("path") or "")
            if path is not None and path in adapters:
                target = (join(path, _MMACTION_LEAF[m.group("leaf")], m.group("kind")) if m is not None
                          else join(path, "scale"))
        _place(key, target, value, params, mapped, unexpected, mismatched)
    wanted = [join(name, n) for name, a in adapters.items() for n, _ in a.named_parameters()]
    missing = [k for k in wanted if k not in mapped]
    return mapped, CheckpointReport(loaded=sorted(mapped), missing_keys=missing,
                                    unexpected_keys=unexpected, mismatched_keys=mismatched)


def load_mmaction_checkpoint(model: nn.Module, source, *, strict: bool = True, module_map=None) -> CheckpointReport:
    """Load MMAction2 STAdapter weights (a file path, a dict, or its 'state_dict' / 'model'
    entry) into model's STAdapters; see map_mmaction_state_dict for the key mapping.

    strict: raise ValueError (with the report) unless every key maps and every adapter
    parameter is filled; otherwise load what maps and return the report. Warns when a target
    adapter's switches differ from MMAction2's forward (build it with
    ``STAdapter(C, Ca, (3, 3, 3), **MMACTION2_SWITCHES)``). MMAction2's module returns its input
    unchanged for single-frame clips (T = 1); ours adapts them like any clip.
    """
    state = _read_checkpoint(source)
    if isinstance(state.get("state_dict"), Mapping):  # mmengine's layout: {'meta': ..., 'state_dict': ...}
        state = _read_checkpoint(state["state_dict"])
    mapped, report = map_mmaction_state_dict(state, model, module_map=module_map)
    if strict and not report.ok:
        raise ValueError(f"MMAction2 checkpoint does not match the model: {report}")
    # the adapter each mapped key belongs to: drop 'fc1.weight' (two parts) or 'scale' (one)
    filled = {".".join(k.split(".")[:-1] if k.split(".")[-1] == "scale" else k.split(".")[:-2]) for k in mapped}
    for name, adapter in iter_st_adapters(model):
        mismatch = _mmaction_switch_mismatch(adapter)
        if name in filled and mismatch:
            warnings.warn(f"adapter {name or '<model>'} received MMAction2 weights but its switches differ from "
                          f"MMAction2's forward: {', '.join(mismatch)}", stacklevel=2)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in mapped.items():
            params[key].copy_(value)
    return report
