"""THE parity rule, its tolerances, the case grid and the input maker -- shared by the tests
(tests/helpers.py re-exports this module), ``python -m st_adapter_fast verify`` and
``st_adapter_fast.verify_model``. State the rule once, here.

Rule (flash-attention's): a backend's error against the float64 reference may be at most
``ratio`` x the error of eager PyTorch (the reference) run in the backend's own dtype, plus a
small floor, and never above a per-dtype backstop. Floors and backstops are relative to
max|ref64| of the tensor compared, so one table serves outputs and gradients of any scale:

    bound = min(ratio * eager_err + floor * max|ref64|,  backstop * max|ref64|)
    PASS  iff  max|got - ref64| <= bound

Errors are max-abs; "relative" errors below are max|got - ref64| / max|ref64| (elementwise
relative errors are meaningless for values near zero).

Only torch is imported here (no pytest, no triton): the CLI and verify_model import it too.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import st_adapter_fast

__all__ = [
    "Tol", "TOLERANCES", "tolerance_for", "PARAM_NAMES", "RESULT_NAMES", "Case", "DtypeMode",
    "DTYPE_MODES", "make_inputs", "place", "run", "reference64", "TensorError", "bound",
    "compare", "format_failures", "parity_grid", "run_mode", "triton_interpreter_on", "fused_device",
]


# --------------------------------------------------------------------------------- the rule
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


def tolerance_for(dtype: torch.dtype) -> Tol:
    """The row of TOLERANCES for a compute dtype (float64 is held to the float32 row)."""
    if dtype == torch.float64:
        return TOLERANCES[torch.float32]
    try:
        return TOLERANCES[dtype]
    except KeyError:
        raise ValueError(f"no parity tolerance for {dtype}; expected one of {list(TOLERANCES)}") from None


def bound(eager_err: Optional[float], scale: float, tol: Tol, *, backstop: bool = True) -> float:
    """Largest error allowed for a tensor whose float64 reference has max|.| = scale.

    eager_err=None (no eager-in-dtype run to compare with) leaves only the backstop.
    backstop=False drops the ceiling: for whole models (verify_model), where a deep network or a
    gradient that cancels to ~0 can put eager PyTorch's own error above it.
    A zero-scale tensor (e.g. an all-zero grad) must come back exactly zero.
    """
    if eager_err is None:
        return max(tol.backstop * scale, 0.0)
    relative = tol.ratio * eager_err + tol.floor * scale
    return max(min(relative, tol.backstop * scale) if backstop else relative, 0.0)


@dataclasses.dataclass
class TensorError:
    """One tensor (the output or a gradient) checked under the rule."""

    name: str
    err: float  # max|got - ref64|
    rel_err: float  # err / max|ref64|
    eager_err: Optional[float]  # max|eager_in_dtype - ref64|
    eager_rel_err: Optional[float]
    bound: float
    scale: float  # max|ref64|
    passed: bool

    def describe(self) -> str:
        eager = "n/a" if self.eager_err is None else f"{self.eager_err:.3e}"
        return (f"{self.name}: err {self.err:.3e} > bound {self.bound:.3e} "
                f"(eager {eager}, max|ref| {self.scale:.3e})")


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    diff = (a.double() - b.double()).abs().max().item()
    return diff if diff == diff else float("inf")  # NaN anywhere is an infinite error


def compare(
    got: Dict[str, torch.Tensor],
    ref64: Dict[str, torch.Tensor],
    eager: Optional[Dict[str, torch.Tensor]],
    dtype: torch.dtype,
    *,
    backstop: bool = True,
) -> List[TensorError]:
    """Apply THE rule to every tensor in ref64 (float64 tensors, same shapes; see ``bound``)."""
    tol = tolerance_for(dtype)
    results = []
    for name, want in ref64.items():
        if name not in got:
            raise KeyError(f"the backend returned no {name!r} (expected {sorted(ref64)})")
        if tuple(got[name].shape) != tuple(want.shape):
            raise ValueError(f"{name}: shape {tuple(got[name].shape)} != reference {tuple(want.shape)}")
        scale = want.abs().max().item() if want.numel() else 0.0
        err = _max_abs_diff(got[name], want)
        eager_err = _max_abs_diff(eager[name], want) if eager is not None else None
        limit = bound(eager_err, scale, tol, backstop=backstop)
        rel = (lambda e: None if e is None else (e / scale if scale > 0 else (0.0 if e == 0 else float("inf"))))
        results.append(TensorError(
            name=name, err=err, rel_err=rel(err), eager_err=eager_err, eager_rel_err=rel(eager_err),
            bound=limit, scale=scale, passed=err <= limit,
        ))
    return results


def format_failures(errors: Sequence[TensorError], label: str, dtype_name: str) -> str:
    failed = [e.describe() for e in errors if not e.passed]
    return f"{label} [{dtype_name}] parity failed:\n  " + "\n  ".join(failed)


# -------------------------------------------------------------------------------- the cases


def format_error(v: Optional[float]) -> str:
    """An error for a report table: 2 significant digits, '-' when not measured."""
    return "-" if v is None else f"{v:.2e}"


def json_finite(obj):
    """JSON has no inf/nan: write them as strings ("inf", "nan")."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: json_finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_finite(v) for v in obj]
    return obj


PARAM_NAMES = ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")
RESULT_NAMES = ("out", "x") + PARAM_NAMES


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def fused_device() -> str:
    """Where the fused backends' checks run here: cuda on a GPU machine, else the interpreter."""
    return "cuda" if torch.cuda.is_available() else "cpu"


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


@dataclasses.dataclass(frozen=True)
class DtypeMode:
    """How a check runs: activations and parameters in ``dtype``, or (autocast) both float32
    under torch.autocast(dtype). Either way the compute dtype, and the tolerance row, is dtype."""

    dtype: torch.dtype
    autocast: bool = False

    @property
    def name(self) -> str:
        short = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]
        return f"autocast-{short}" if self.autocast else short

    @property
    def tensor_dtype(self) -> torch.dtype:
        return torch.float32 if self.autocast else self.dtype


DTYPE_MODES: Dict[str, DtypeMode] = {
    m.name: m for m in (
        DtypeMode(torch.float32), DtypeMode(torch.float16), DtypeMode(torch.bfloat16),
        DtypeMode(torch.float16, autocast=True), DtypeMode(torch.bfloat16, autocast=True),
    )
}


def parity_grid(quick: bool = False) -> List[Case]:
    """docs/design.md §6: T in {1, 2, 8, 17} x kt in {1, 3, 5} x P in {0, 1, 2}, spatial counts
    not divisible by any block size, C and Ca not powers of two, contiguous and sliced x, with
    and without biases; plus a wide-channel case (several K blocks) and a (3, 3, 3) kernel.

    quick: a subset touching every value of T, kt and P once (minutes -> seconds on CPU).
    """
    if quick:
        return [
            Case(batch=2, frames=2, grid=(3, 3), prefix=1, channels=24, adapter_channels=40, kernel=(3, 1, 1)),
            Case(batch=1, frames=17, grid=(2, 3), prefix=2, channels=40, adapter_channels=24,
                 kernel=(5, 1, 1), noncontiguous=True),
            Case(batch=3, frames=1, grid=(5, 7), prefix=0, channels=72, adapter_channels=20,
                 kernel=(1, 1, 1), bias=False),
            Case(batch=1, frames=8, grid=(3, 5), prefix=1, channels=24, adapter_channels=12, kernel=(3, 1, 1)),
        ]
    # (grid, C, Ca): spatial 9, 35, 143, 6 tokens; no C or Ca a power of two
    shapes = [((3, 3), 24, 40), ((5, 7), 40, 24), ((11, 13), 72, 36), ((2, 3), 136, 72)]
    cases = []
    i = 0
    for frames in (1, 2, 8, 17):
        for kt in (1, 3, 5):
            for prefix in (0, 1, 2):
                grid, c, ca = shapes[i % len(shapes)]
                if frames >= 8 and grid == (11, 13):
                    grid = (7, 5)  # keep the long clips affordable; 35 tokens is still ragged
                cases.append(Case(
                    batch=2 if frames < 8 else 1, frames=frames, grid=grid, prefix=prefix,
                    channels=c, adapter_channels=ca, kernel=(kt, 1, 1),
                    noncontiguous=i % 3 == 1, bias=i % 5 != 4,
                ))
                i += 1
    cases.append(Case(batch=2, frames=4, grid=(7, 7), prefix=1, channels=200, adapter_channels=100, kernel=(3, 1, 1)))
    cases.append(Case(batch=1, frames=4, grid=(3, 4), prefix=1, channels=24, adapter_channels=40, kernel=(3, 3, 3)))
    return cases


# ------------------------------------------------------------------------- inputs and runs
def make_inputs(case: Case, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """float64 CPU master copies: x, grad_out and random NON-ZERO parameters (a fresh adapter
    is the identity and would prove nothing)."""
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


def place(t: Optional[torch.Tensor], dtype, device, noncontiguous: bool = False) -> Optional[torch.Tensor]:
    """A fresh leaf copy of a master tensor (never the master itself, even in float64 on CPU)."""
    if t is None:
        return None
    t = t.detach().to(device=device, dtype=dtype, copy=True)
    if noncontiguous:
        # slice out of a wider tensor: a real strided view, as users' x[:, :, :C] would be
        wide = torch.zeros(*t.shape[:-1], t.shape[-1] * 2 + 1, device=device, dtype=dtype)
        wide[..., 1 : 1 + 2 * t.shape[-1] : 2] = t
        t = wide[..., 1 : 1 + 2 * t.shape[-1] : 2]
        assert not t.is_contiguous()
    return t


def run(
    case: Case,
    inputs: Dict[str, Optional[torch.Tensor]],
    backend: str,
    dtype: torch.dtype,
    device: str,
    *,
    grads: bool = True,
    autocast: Optional[torch.dtype] = None,
    param_dtype: Optional[torch.dtype] = None,
) -> Dict[str, torch.Tensor]:
    """Output and gradients of x and every parameter, returned as float64 CPU tensors."""
    x = place(inputs["x"], dtype, device, case.noncontiguous).requires_grad_(grads)
    pdt = param_dtype or dtype
    params = [place(inputs[n], pdt, device) for n in PARAM_NAMES]
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


def run_mode(case: Case, inputs, backend: str, mode: DtypeMode, device: str, *, grads: bool = True):
    """``run`` in a DtypeMode: autocast modes feed float32 x and parameters to torch.autocast."""
    return run(case, inputs, backend, mode.tensor_dtype, device, grads=grads,
               autocast=mode.dtype if mode.autocast else None)


def reference64(case: Case, inputs, *, grads: bool = True) -> Dict[str, torch.Tensor]:
    return run(case, inputs, "reference", torch.float64, "cpu", grads=grads)
