"""The parity grid users can run: ``python -m st_adapter_fast verify``.

CLI: every backend available on the device, against the reference evaluated in float64 on CPU,
over the case grid of st_adapter_fast.parity (docs/design.md §6), for the output and the
gradient of x and of every parameter, under THE rule of st_adapter_fast.parity (the tests use
the same code). Exit status 0 only when every check passes.

    python -m st_adapter_fast verify --quick                 # CPU: reference + Triton interpreter
    python -m st_adapter_fast verify --device cuda --json verify.json
    python -m st_adapter_fast verify --variants [--quick]    # docs/design.md §9 variants grid

``--variants`` checks the variant switches (LayerNorm, activations, prefix MLP, scale, DropPath,
spatial kernels) for every backend that can run them; a backend that runs none of them is listed
as unavailable with its reason, never counted as passing.

Whole-model parity (``verify_model``) lives in st_adapter_fast/verify_model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import sys
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .parity import format_error, json_finite

__all__ = ["main", "run_grid", "GridResult"]


# ====================================================================================== CLI
_DTYPE_ALIASES = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16",
    "bf16": "bf16", "bfloat16": "bf16",
    "autocast-fp16": "autocast-fp16", "autocast-float16": "autocast-fp16",
    "autocast-bf16": "autocast-bf16", "autocast-bfloat16": "autocast-bf16",
}
DEFAULT_DTYPES = ("fp32", "fp16", "bf16", "autocast-fp16", "autocast-bf16")


class _UsageError(Exception):
    """A bad command line: printed with the usage line, exit status 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m st_adapter_fast verify",
        description="Parity of every available backend against the float64 reference (output and "
                    "all gradients). Exit status 0 only if every check passes.",
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="where the backends run (default: cuda if available, else cpu; on cpu the "
                        "Triton kernels run in the interpreter)")
    p.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                   help="backends to check (default: reference and every registered fused backend)")
    p.add_argument("--dtypes", nargs="+", default=None, metavar="DTYPE",
                   help=f"any of {', '.join(DEFAULT_DTYPES)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset of the grid touching every T, kt and P (under a minute on CPU)")
    p.add_argument("--variants", action="store_true",
                   help="the docs/design.md §9 variants grid (each switch alone, MMAction2's combination, "
                        "P 0-2, non-square grids, kernels (1|3|5, 3, 3), T 1/2/8) instead of the parity grid; "
                        "with --quick each variant once")
    p.add_argument("--json", metavar="PATH", default=None, help="also write every number to this JSON file")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs and parameters")
    p.add_argument("-v", "--verbose", action="store_true",
                   help="one row per checked tensor (default: one row per case, its worst tensor; "
                        "failed cases always show every tensor)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _prepare_device(device: Optional[str]) -> Tuple[str, List[str]]:
    """Pick the device and set TRITON_INTERPRET for it. The flag must be set before triton is
    imported (triton.jit decides at decoration time), so this runs before any kernel import."""
    notes = []
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            build = torch.version.cuda
            raise _UsageError(
                "--device cuda: no CUDA device is available (torch.cuda.is_available() is False; "
                + (f"this torch build supports CUDA {build}, but no GPU or driver was found)" if build
                   else f"this torch {torch.__version__} is a CPU-only build)")
                + "; use --device cpu to check the reference and the Triton interpreter"
            )
        if os.environ.get("TRITON_INTERPRET") == "1":
            if "triton" not in sys.modules:
                os.environ.pop("TRITON_INTERPRET")
                notes.append("unset TRITON_INTERPRET=1 so the Triton kernels compile for the GPU")
            else:
                notes.append("TRITON_INTERPRET=1 was set before triton was imported: the Triton "
                             "backend cannot run on CUDA tensors in this process")
    else:
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" not in sys.modules:
                os.environ["TRITON_INTERPRET"] = "1"
                notes.append("set TRITON_INTERPRET=1: the Triton kernels run in the interpreter on CPU")
            else:
                notes.append("triton was imported before TRITON_INTERPRET=1 could be set: the Triton "
                             "backend cannot run on CPU tensors in this process")
    return device, notes


def _split_list(requested: Sequence[str]) -> List[str]:
    """Names given as separate words or comma lists ("a b", "a,b"), empty entries dropped."""
    return [name.strip() for entry in requested for name in entry.split(",") if name.strip()]


def _select_backends(requested: Optional[Sequence[str]]) -> List[str]:
    from . import backends as _backends

    registered = _backends.available_backends()  # "reference" first
    if requested is None:
        # test-only backends register with auto=False; they run only when named
        return ["reference"] + [n for n in registered[1:] if _backends.get_backend(n).auto]
    names = []
    for name in _split_list(requested):
        if name == "auto":
            raise _UsageError("--backends auto: name the backends to check (auto picks one of them "
                              f"per call); registered: {', '.join(registered)}")
        if name not in registered:
            raise _UsageError(f"--backends: unknown backend {name!r}; registered backends: "
                              f"{', '.join(registered)}")
        if name not in names:
            names.append(name)
    return names


def _select_modes(requested: Optional[Sequence[str]]):
    from .parity import DTYPE_MODES

    if requested is None:
        return [DTYPE_MODES[n] for n in DEFAULT_DTYPES]
    modes = []
    for name in _split_list(requested):
        key = _DTYPE_ALIASES.get(name.lower())
        if key is None:
            raise _UsageError(f"--dtypes: unknown dtype {name!r}; expected some of "
                              f"{', '.join(DEFAULT_DTYPES)}")
        if DTYPE_MODES[key] not in modes:
            modes.append(DTYPE_MODES[key])
    return modes


def _backend_unavailable(name: str, device: str, kernel_size, dtype: torch.dtype,
                         x: Optional[torch.Tensor] = None, variant=None) -> Optional[str]:
    """Why backend `name` cannot run this call here (None: it can); variant: the case's
    docs/design.md §9 switches (None: official)."""
    if name == "reference":
        return None
    from . import backends as _backends

    if x is None:
        x = torch.empty(0, device=device, dtype=dtype)
    try:
        return _backends.get_backend(name).reason(x, tuple(kernel_size), dtype, variant)
    except Exception as err:  # a backend whose probe itself breaks is unavailable, and says so
        return f"availability check raised {type(err).__name__}: {err}"


@dataclasses.dataclass
class CheckRow:
    """One backend x dtype mode x case: PASS, FAIL, ERROR (it raised) or SKIP (unsupported case)."""

    backend: str
    dtype: str
    case: str
    status: str
    tensors: list  # of parity.TensorError
    reason: Optional[str] = None
    seconds: float = 0.0

    @property
    def failed(self) -> bool:
        return self.status in ("FAIL", "ERROR")

    def worst(self):
        """The tensor closest to (or furthest past) its bound."""
        if not self.tensors:
            return None
        return max(self.tensors, key=lambda e: (e.err / e.bound) if e.bound > 0 else (0.0 if e.err == 0 else math.inf))

    def to_dict(self, case_obj) -> dict:
        return {
            "backend": self.backend, "dtype": self.dtype, "case": self.case,
            "case_params": dataclasses.asdict(case_obj), "status": self.status, "reason": self.reason,
            "seconds": round(self.seconds, 4),
            "tensors": [dataclasses.asdict(t) for t in self.tensors],
        }


@dataclasses.dataclass
class GridResult:
    device: str
    device_name: str
    backends: List[str]
    unavailable: Dict[str, str]  # backend -> why it cannot run on this device at all
    requested_unavailable: List[str]  # explicitly named backends among those
    rows: List[CheckRow]
    cases: Dict[str, Any]  # label -> Case
    notes: List[str]
    seconds: float

    @property
    def counts(self) -> Dict[str, int]:
        counts = {"PASS": 0, "FAIL": 0, "ERROR": 0, "SKIP": 0}
        for r in self.rows:
            counts[r.status] += 1
        return counts

    @property
    def passed(self) -> bool:
        return not any(r.failed for r in self.rows) and not self.requested_unavailable

    def summary(self) -> str:
        c = self.counts
        parts = [f"{c['PASS']} passed", f"{c['FAIL'] + c['ERROR']} failed"]
        if c["SKIP"]:
            parts.append(f"{c['SKIP']} skipped (case not supported by the backend)")
        text = f"verify {'PASSED' if self.passed else 'FAILED'}: " + ", ".join(parts)
        text += f" on {self.device} ({self.device_name}) in {self.seconds:.1f} s"
        if self.unavailable:
            text += "; unavailable: " + "; ".join(f"{n} ({why})" for n, why in self.unavailable.items())
        return text


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine() or "cpu"


class _Progress:
    """tqdm when installed, else a plain line every ~10% on stderr."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled and total > 0
        self._bar = None
        self._next_print = 0
        if self.enabled:
            try:
                from tqdm.auto import tqdm

                self._bar = tqdm(total=total, desc="verify", unit="check", file=sys.stderr, leave=False)
            except ImportError:
                self._bar = None

    def update(self, desc: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_postfix_str(desc, refresh=False)
            self._bar.update(1)
        elif self.done >= self._next_print or self.done == self.total:
            print(f"verify: {self.done}/{self.total} checks ({desc})", file=sys.stderr, flush=True)
            self._next_print = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def run_grid(
    device: str,
    backend_names: Sequence[str],
    modes,
    cases,
    *,
    seed: int = 0,
    progress: bool = True,
    requested: bool = False,
    notes: Sequence[str] = (),
    variants: bool = False,
) -> GridResult:
    """Check every backend x dtype mode x case; nothing is printed but the progress bar.

    variants: the cases are the variants grid: a fused backend that can run none of them is
    reported unavailable (with its reason for the first case) instead of as rows of SKIPs."""
    from . import parity

    start = time.perf_counter()
    unavailable: Dict[str, str] = {}
    active = []
    for name in backend_names:
        # whole-backend availability: the common case (kernel (3,1,1)) in any dtype asked for
        reasons = [_backend_unavailable(name, device, (3, 1, 1), m.dtype) for m in modes]
        if all(r is not None for r in reasons):
            unavailable[name] = reasons[0]
        else:
            active.append(name)

    rows: List[CheckRow] = []
    bar = _Progress(len(active) * len(modes) * len(cases), progress)
    try:
        for case_index, case in enumerate(cases):
            # a DropPath mask comes from the device's RNG: draw the float64 one there too
            ref_device = device if case.variant.drop_path > 0 else "cpu"
            # one input set for every mode: ReLU gates cleared for the 16-bit ones (fp32 does not
            # mind), d(scale) uncancelled (parity.condition_inputs)
            inputs = parity.condition_inputs(case, parity.make_inputs(case, seed=seed + case_index),
                                             device=ref_device)
            ref64 = parity.reference64(case, inputs, device=ref_device)
            for mode in modes:
                eager = None
                eager_error = None
                for name in active:
                    t0 = time.perf_counter()
                    row = CheckRow(name, mode.name, case.label(), "PASS", [])
                    probe = torch.empty(0, device=device, dtype=mode.tensor_dtype)
                    variant = None if case.variant.official else case.variant
                    why = _backend_unavailable(name, device, case.kernel, mode.dtype, probe, variant)
                    if why is not None:
                        row.status, row.reason = "SKIP", why
                    else:
                        try:
                            if eager is None and eager_error is None:
                                try:
                                    eager = parity.run_mode(case, inputs, "reference", mode, device)
                                except Exception as err:  # noqa: BLE001 -- reported as a row
                                    eager_error = f"eager reference raised {type(err).__name__}: {err}"
                            if eager_error is not None:
                                raise RuntimeError(eager_error)
                            # the reference backend IS eager PyTorch in that dtype: reuse the run
                            got = eager if name == "reference" else parity.run_mode(case, inputs, name, mode, device)
                            row.tensors = parity.compare(got, ref64, eager, mode.dtype,
                                                         exempt=parity.backstop_exempt(case))
                            row.status = "PASS" if all(t.passed for t in row.tensors) else "FAIL"
                        except Exception as err:  # noqa: BLE001 -- a crash is a failed check, not an abort
                            row.status, row.reason = "ERROR", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                    row.seconds = time.perf_counter() - t0
                    rows.append(row)
                    bar.update(f"{name} {mode.name} {case.label()}")
    finally:
        bar.close()
    notes = list(notes)
    if variants:
        for name in [n for n in active if n != "reference"]:
            mine = [r for r in rows if r.backend == name]
            if mine and all(r.status == "SKIP" for r in mine):
                unavailable[name] = f"runs none of the variants grid's cases (first: {mine[0].case}: {mine[0].reason})"
                rows = [r for r in rows if r.backend != name]
        if any(parity.backstop_exempt(c) for c in cases):
            notes.append("the backstop does not bind cases with a ReLU (gate flips: eager bf16 itself exceeds it) "
                         "nor the scale gradient (a cancelling sum); ratio * eager + floor still does "
                         "(st_adapter_fast.parity.backstop_exempt)")
        if not any(r.backend != "reference" for r in rows):
            notes.append("no fused backend here covers the variant switches (docs/design.md §9; Triton fuses "
                         "them: on CPU under TRITON_INTERPRET=1): this grid checked only the reference -- eager "
                         "PyTorch in each dtype -- against its own float64 run")
    return GridResult(
        device=device, device_name=_device_name(device), backends=list(backend_names),
        unavailable=unavailable, requested_unavailable=[n for n in unavailable if requested],
        rows=rows, cases={c.label(): c for c in cases}, notes=notes,
        seconds=time.perf_counter() - start,
    )


def format_grid(result: GridResult, verbose: bool = False) -> str:
    """One table per backend x dtype; a row per case (its worst tensor) or per tensor."""
    from .parity import TOLERANCES, DTYPE_MODES

    out = []
    for note in result.notes:
        out.append(f"note: {note}")
    out.append(f"device: {result.device} ({result.device_name}), torch {torch.__version__}")
    out.append("rule: PASS iff max|got - ref64| <= min(ratio * max|eager - ref64| + floor * max|ref64|, "
               "backstop * max|ref64|); rel = err / max|ref64|; eager = the reference run in that dtype")
    out.append("tolerances: " + "; ".join(
        f"{str(dt).replace('torch.', '')} ratio {t.ratio:g} floor {t.floor:g} backstop {t.backstop:g}"
        for dt, t in TOLERANCES.items()))
    for name, why in result.unavailable.items():
        out.append(f"backend {name}: UNAVAILABLE on {result.device}: {why}")
    header = ("case", "tensor", "err", "rel", "eager err", "eager rel", "bound", "status")
    grouped: Dict[Tuple[str, str], List[CheckRow]] = {}
    for row in result.rows:
        grouped.setdefault((row.backend, row.dtype), []).append(row)
    order = {name: i for i, name in enumerate(result.backends)}
    mode_order = {name: i for i, name in enumerate(DTYPE_MODES)}
    for (backend, dtype), rows in sorted(grouped.items(), key=lambda kv: (order[kv[0][0]], mode_order[kv[0][1]])):
        table = []
        for row in rows:
            if row.status in ("SKIP", "ERROR"):
                table.append((row.case, "-", "-", "-", "-", "-", "-", f"{row.status}: {row.reason}"))
                continue
            shown = row.tensors if (verbose or row.failed) else [row.worst()]
            for i, t in enumerate(shown):
                status = ("PASS" if t.passed else "FAIL") if (verbose or row.failed) else row.status
                table.append((row.case if i == 0 else "", t.name, format_error(t.err), format_error(t.rel_err),
                              format_error(t.eager_err), format_error(t.eager_rel_err), format_error(t.bound), status))
        widths = [max(len(header[i]), *(len(r[i]) for r in table)) for i in range(len(header) - 1)]
        out.append("")
        scope = "every tensor" if verbose else "each case's tensor with the largest err/bound"
        out.append(f"== {backend} / {dtype}: {sum(not r.failed and r.status != 'SKIP' for r in rows)}"
                   f"/{len(rows)} cases passed; rows: {scope} ==")
        fmt_row = lambda r: "  ".join(v.ljust(w) for v, w in zip(r[:-1], widths)) + "  " + r[-1]
        out.append(fmt_row(header))
        out.extend(fmt_row(r) for r in table)
    out.append("")
    for name in result.requested_unavailable:
        out.append(f"requested backend {name} could not be checked: {result.unavailable[name]}")
    out.append(result.summary())
    return "\n".join(out)


def grid_to_json(result: GridResult, args: Dict[str, Any]) -> dict:
    from . import __version__
    from .parity import TOLERANCES

    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001 -- missing or broken triton is just "none"
        triton_version = None
    return {
        "st_adapter_fast": __version__,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "device": result.device,
        "device_name": result.device_name,
        "args": args,
        "rule": {
            "formula": "err <= min(ratio * eager_err + floor * scale, backstop * scale), scale = max|ref64|",
            "tolerances": {str(dt).replace("torch.", ""): dataclasses.asdict(t) for dt, t in TOLERANCES.items()},
        },
        "backends": {
            name: {"available": name not in result.unavailable, "reason": result.unavailable.get(name)}
            for name in result.backends
        },
        "results": [row.to_dict(result.cases[row.case]) for row in result.rows],
        "summary": {
            "passed": result.counts["PASS"],
            "failed": result.counts["FAIL"] + result.counts["ERROR"],
            "skipped": result.counts["SKIP"],
            "unavailable": dict(result.unavailable),
            "requested_unavailable": list(result.requested_unavailable),
            "seconds": round(result.seconds, 3),
            "all_passed": result.passed,
            "line": result.summary(),
        },
        "notes": list(result.notes),
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        device, notes = _prepare_device(args.device)
        names = _select_backends(args.backends)
        modes = _select_modes(args.dtypes)
    except _UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2

    from .parity import parity_grid, variant_grid

    cases = variant_grid(full=not args.quick) if args.variants else parity_grid(quick=args.quick)
    result = run_grid(device, names, modes, cases, seed=args.seed, progress=not args.no_progress,
                      requested=args.backends is not None, notes=notes, variants=args.variants)
    print(format_grid(result, verbose=args.verbose), flush=True)
    if args.json:
        payload = grid_to_json(result, {
            "device": device, "backends": names, "dtypes": [m.name for m in modes],
            "quick": args.quick, "variants": args.variants, "seed": args.seed, "cases": len(cases),
        })
        directory = os.path.dirname(os.path.abspath(args.json))
        os.makedirs(directory, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(json_finite(payload), f, indent=1)
        print(f"wrote {args.json}")
    return 0 if result.passed else 1
