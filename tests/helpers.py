"""Shared parity machinery: inputs, the reference in float64, and THE tolerance rule.

Rule (flash-attention's): a backend's error against the float64 reference may be at most
RATIO x the error of eager PyTorch (the reference) run in the backend's own dtype, plus a small
floor; and never above a per-dtype backstop. Floors and backstops are relative to max|ref64|
of the tensor compared, so one table serves outputs and gradients of any scale.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Sequence, Tuple

import pytest
import torch

import st_adapter_fast
from st_adapter_fast import reference


@dataclasses.dataclass(frozen=True)
class Tol:
    ratio: float  # allowed multiple of eager-in-dtype's error
    floor: float  # absolute slack, as a fraction of max|ref64|
    backstop: float  # hard ceiling, as a fraction of max|ref64|


TOLERANCES: Dict[torch.dtype, Tol] = {
    torch.float32: Tol(ratio=2.0, floor=1e-5, backstop=1e-4),
    torch.float16: Tol(ratio=2.0, floor=1e-3, backstop=1e-2),
    torch.bfloat16: Tol(ratio=2.0, floor=8e-3, backstop=5e-2),
}

PARAM_NAMES = ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")
RESULT_NAMES = ("out", "x") + PARAM_NAMES


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_device() -> str:
    """Where the fused backends' tests run here: cuda on a GPU machine, else the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
requires_interpreter = pytest.mark.skipif(
    not triton_interpreter_on(), reason="the CPU twin runs the Triton kernels under TRITON_INTERPRET=1"
)


@dataclasses.dataclass(frozen=True)
class Case:
    batch: int = 2
    frames: int = 3
    grid: Tuple[int, int] = (3, 3)
    prefix: int = 1
    channels: int = 24
    adapter_channels: int = 40
    kernel: Tuple[int, int, int] = (3, 1, 1)
    noncontiguous: bool = False
    bias: bool = True

    @property
    def seq_len(self) -> int:
        return self.prefix + self.grid[0] * self.grid[1]

    def label(self) -> str:
        return (f"B{self.batch}T{self.frames}g{self.grid[0]}x{self.grid[1]}P{self.prefix}"
                f"C{self.channels}Ca{self.adapter_channels}k{'x'.join(map(str, self.kernel))}"
                f"{'-strided' if self.noncontiguous else ''}{'' if self.bias else '-nobias'}")


def make_inputs(case: Case, seed: int = 0) -> Dict[str, torch.Tensor]:
    """float64 CPU master copies: x, dO and random NON-ZERO parameters (a fresh adapter is the
    identity and would prove nothing)."""
    gen = torch.Generator().manual_seed(seed)
    c, ca = case.channels, case.adapter_channels
    kt, kh, kw = case.kernel

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    x = rnd(case.batch * case.frames, case.seq_len, c)
    return {
        "x": x,
        "grad_out": rnd(*x.shape),
        "fc1_weight": rnd(ca, c, scale=c ** -0.5),
        "fc1_bias": rnd(ca, scale=0.5) if case.bias else None,
        "conv_weight": rnd(ca, 1, kt, kh, kw, scale=(kt * kh * kw) ** -0.5),
        "conv_bias": rnd(ca, scale=0.5) if case.bias else None,
        "fc2_weight": rnd(c, ca, scale=ca ** -0.5),
        "fc2_bias": rnd(c, scale=0.5) if case.bias else None,
    }


def _place(t: Optional[torch.Tensor], dtype, device, noncontiguous=False) -> Optional[torch.Tensor]:
    if t is None:
        return None
    t = t.to(device=device, dtype=dtype)
    if noncontiguous:
        # slice out of a wider tensor: a real strided view, as users' x[:, :, :C] would be
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2 + 1, device=device, dtype=dtype)
        wide[..., 1 : 1 + 2 * t.shape[-1] : 2] = t
        t = wide[..., 1 : 1 + 2 * t.shape[-1] : 2]
        assert not t.is_contiguous()
    return t


def run(
    case: Case,
    inputs: Dict[str, torch.Tensor],
    backend: str,
    dtype: torch.dtype,
    device: str,
    *,
    grads: bool = True,
    autocast: Optional[torch.dtype] = None,
    param_dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Output and gradients of x and every parameter, returned as float64 CPU tensors."""
    x = _place(inputs["x"], dtype, device, case.noncontiguous).requires_grad_(grads)
    pdt = param_dtype or dtype
    params = [_place(inputs[n], pdt, device) for n in PARAM_NAMES]
    for p in params:
        if p is not None:
            p.requires_grad_(grads)
    kwargs = dict(num_prefix_tokens=case.prefix, grid_size=case.grid, backend=backend)
    if autocast is not None:
        with torch.autocast(device_type=device, dtype=autocast):
            out = st_adapter_fast.st_adapter(x, case.frames, *params, **kwargs)
    else:
        out = st_adapter_fast.st_adapter(x, case.frames, *params, **kwargs)
    result = {"out": out.detach().double().cpu()}
    if grads:
        out.backward(inputs["grad_out"].to(device=device, dtype=out.dtype))
        result["x"] = x.grad.double().cpu()
        for name, p in zip(PARAM_NAMES, params):
            if p is not None:
                result[name] = p.grad.double().cpu()
    return result


def reference64(case: Case, inputs, *, grads: bool = True) -> Dict[str, torch.Tensor]:
    return run(case, inputs, "reference", torch.float64, "cpu", grads=grads)


def assert_parity(
    got: Dict[str, torch.Tensor],
    ref64: Dict[str, torch.Tensor],
    eager: Dict[str, torch.Tensor],
    dtype: torch.dtype,
    label: str = "",
) -> Dict[str, float]:
    """Apply THE rule to every tensor in ref64; returns the errors (for reporting)."""
    tol = TOLERANCES[dtype]
    errors = {}
    failures = []
    for name, want in ref64.items():
        assert name in got, f"{label}: backend returned no {name}"
        scale = want.abs().max().item() if want.numel() else 0.0
        err = (got[name] - want).abs().max().item() if want.numel() else 0.0
        eager_err = (eager[name] - want).abs().max().item() if want.numel() else 0.0
        bound = min(tol.ratio * eager_err + tol.floor * scale, tol.backstop * scale)
        # a zero-scale tensor (e.g. an all-zero grad) must come back exactly zero
        errors[name] = err
        if not err <= max(bound, 0.0):
            failures.append(f"{name}: err {err:.3e} > bound {bound:.3e} (eager {eager_err:.3e}, max|ref| {scale:.3e})")
    assert not failures, f"{label} [{dtype}] parity failed:\n  " + "\n  ".join(failures)
    return errors
