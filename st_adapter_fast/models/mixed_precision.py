"""The official ST-Adapter precision recipe: frozen backbone in fp16 (or bf16), adapters and head
in fp32, forward under autocast, GradScaler for fp16.

Why each part: the frozen weights never receive updates, so half precision costs them nothing
and halves their memory and bandwidth; the trainable weights stay fp32 so small updates are not
rounded away (fp16 has 11 bits of mantissa) and the optimizer state is fp32; autocast runs the
adapters' matmuls in the half dtype with their fp32 master weights; fp16 gradients underflow
without loss scaling, bf16 ones do not (8 exponent bits), so bf16 needs no scaler.

    from st_adapter_fast.models.mixed_precision import prepare_mixed_precision

    amp = prepare_mixed_precision(model, torch.float16)   # casts frozen params, returns a recipe
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for clips, labels in loader:                           # clips (B, 3, T, H, W)
        with amp.autocast():
            loss = F.cross_entropy(model(clips), labels)
        amp.step(loss, optimizer, max_grad_norm=1.0)       # scale, backward, unscale, clip, step, update

``amp.step`` is the usual sequence spelled out once: ``scaler.scale(loss).backward();
scaler.unscale_(opt); clip_grad_norm_; scaler.step(opt); scaler.update(); opt.zero_grad()``
-- so the grads are zeroed (set to None) when it returns.

Outside ``amp.autocast()`` (an eval loop, ``model(clips)`` under ``torch.no_grad()``) the prepared
model enters the recipe's autocast itself: its frozen weights are half precision, so a plain fp32
forward would fail inside the first layer ("Input type (float) and bias type (c10::Half) should
be the same"). Outputs then come in the autocast dtype, as under ``amp.autocast()``. Pass
``autocast_forward=False`` to get an error that says so instead. The hook sits on the module
passed in: call that module, not a submodule, outside autocast.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import List, Optional

import torch
from torch import nn

__all__ = ["MixedPrecision", "prepare_mixed_precision"]

_HALF = (torch.float16, torch.bfloat16)


@dataclasses.dataclass
class MixedPrecision:
    dtype: torch.dtype
    device_type: str
    scaler: Optional["torch.amp.GradScaler"]  # fp16 only
    # the forward hooks prepare_mixed_precision put on the model (remove() takes them off)
    hooks: List = dataclasses.field(default_factory=list, repr=False)

    def remove(self) -> None:
        """Take the forward hooks off the model (the parameter dtypes stay as they are)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer, *,
             max_grad_norm: Optional[float] = None) -> Optional[torch.Tensor]:
        """backward + optimizer step (+ gradient clipping on unscaled grads); zeroes the grads.
        Returns the total grad norm when clipping, else None. With fp16, a step whose grads
        overflowed is skipped by the scaler (and the scale lowered), as GradScaler does."""
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = None
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if max_grad_norm is not None:
                self.scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if max_grad_norm is not None:
                norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm


_HOOKS_ATTR = "_st_adapter_fast_amp"  # on the model: the MixedPrecision whose hooks it carries


def _install_forward_hooks(model: nn.Module, amp: MixedPrecision, autocast_forward: bool) -> None:
    """Hooks that make a forward outside autocast either run under amp's autocast or fail clearly."""
    previous = getattr(model, _HOOKS_ATTR, None)
    if previous is not None:
        previous.remove()  # prepared again: the new recipe's hooks replace the old ones
    active: List[Optional[contextlib.AbstractContextManager]] = []  # one entry per forward in flight

    def enter(module, args):
        if torch.is_autocast_enabled(amp.device_type):
            active.append(None)
            return
        if not autocast_forward:
            raise RuntimeError(
                f"this model was prepared by prepare_mixed_precision({amp.dtype}): its frozen weights are "
                f"{amp.dtype}, so run it under `with amp.autocast():` (eval loops too), or prepare it with "
                f"autocast_forward=True to have it enter autocast itself")
        ctx = amp.autocast()
        ctx.__enter__()
        active.append(ctx)

    def leave(module, args, output):
        ctx = active.pop() if active else None
        if ctx is not None:
            ctx.__exit__(None, None, None)

    # always_call: the autocast entered above is left even when the forward raises
    amp.hooks += [model.register_forward_pre_hook(enter), model.register_forward_hook(leave, always_call=True)]
    setattr(model, _HOOKS_ATTR, amp)


def prepare_mixed_precision(
    model: nn.Module, dtype: torch.dtype = torch.float16, *, device_type: Optional[str] = None,
    autocast_forward: bool = True,
) -> MixedPrecision:
    """Cast frozen parameters (requires_grad=False) to ``dtype`` and trainable ones to fp32, in
    place (the Parameter objects stay, so optimizers built before or after both work).

    Args:
        model: e.g. a VideoClassifier whose backbone inject_st_adapters froze.
        dtype: torch.float16 (official; returns a GradScaler) or torch.bfloat16 (no scaler).
        device_type: for autocast / GradScaler; read off the model's parameters when None.
        autocast_forward: a forward of ``model`` outside autocast enters the recipe's autocast
            itself (True), or raises a RuntimeError saying to use ``amp.autocast()`` (False).
    Raises ValueError if nothing is trainable (inject adapters first) or dtype is not half.
    """
    if dtype not in _HALF:
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    params = list(model.parameters())
    if not any(p.requires_grad for p in params):
        raise ValueError("no trainable parameters: inject ST-Adapters (inject_st_adapters) before "
                         "preparing mixed precision")
    if device_type is None:
        device_type = params[0].device.type if params else "cpu"
    for p in params:
        if not p.is_floating_point():
            continue
        want = torch.float32 if p.requires_grad else dtype
        if p.dtype != want:
            p.data = p.data.to(want)  # as the official model does: same Parameter, new storage
    scaler = torch.amp.GradScaler(device_type) if dtype == torch.float16 else None
    amp = MixedPrecision(dtype=dtype, device_type=device_type, scaler=scaler)
    _install_forward_hooks(model, amp, autocast_forward)
    return amp
