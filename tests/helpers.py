"""Test-side view of the shared parity machinery.

THE rule, its tolerances, the cases and the input maker live in st_adapter_fast/parity.py (the
`verify` CLI and verify_model use the same code); this module re-exports them and adds the
pytest markers and ``assert_parity``.
"""

from __future__ import annotations

import itertools
from typing import Dict, List

import pytest
import torch

from st_adapter_fast.parity import (  # noqa: F401  (re-exported for the tests)
    DTYPE_MODES,
    PARAM_NAMES,
    RESULT_NAMES,
    TOLERANCES,
    Case,
    DtypeMode,
    Tol,
    TensorError,
    bound,
    compare,
    format_failures,
    fused_device,
    make_inputs,
    parity_grid,
    place,
    reference64,
    run,
    run_mode,
    triton_interpreter_on,
)

_place = place  # older name, kept for tests that used it

_skip_without_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def requires_cuda(test):
    """Decorator for a test that needs a CUDA GPU: marked `gpu` (the GPU verdict's parity stage
    runs `pytest -m gpu`) and skipped where torch sees no GPU."""
    return pytest.mark.gpu(_skip_without_cuda(test))


def covering_grid() -> List[Case]:
    """The fused backends' parity grid: a covering subset of the full product -- every T with
    every kt, P and strides cycled in, spatial counts (6, 7, 9, 10) and channel counts
    (24, 40, 20, 36) off every block size. Shared by the Triton and the CUDA parity tests."""
    frames = (1, 2, 8, 17)
    kts = (1, 3, 5)
    grids = ((2, 3), (1, 7), (3, 3), (2, 5))
    channels = ((24, 40), (40, 20), (20, 36))
    cases = []
    for i, (t, kt) in enumerate(itertools.product(frames, kts)):
        c, ca = channels[i % len(channels)]
        cases.append(Case(batch=1 + i % 2, frames=t, grid=grids[i % len(grids)], prefix=i % 3, channels=c,
                          adapter_channels=ca, kernel=(kt, 1, 1), noncontiguous=i % 4 == 3, bias=i != 5))
    return cases


requires_interpreter = pytest.mark.skipif(
    not triton_interpreter_on(), reason="the CPU twin runs the Triton kernels under TRITON_INTERPRET=1"
)


def assert_parity(
    got: Dict[str, torch.Tensor],
    ref64: Dict[str, torch.Tensor],
    eager: Dict[str, torch.Tensor],
    dtype: torch.dtype,
    label: str = "",
) -> Dict[str, float]:
    """Apply THE rule to every tensor in ref64; returns the errors (for reporting)."""
    errors = compare(got, ref64, eager, dtype)
    assert all(e.passed for e in errors), format_failures(errors, label, str(dtype))
    return {e.name: e.err for e in errors}


def check_fused_switches(case: Case, inputs, mode_name: str, device: str, label: str = "") -> Dict[str, torch.Tensor]:
    """The Triton backend on a docs/design.md §9 variant case under THE rule (backstop exempt as
    parity.backstop_exempt says): a DropPath case's seed must drop some clips and keep others
    (asserted), the output and every gradient against float64 and eager in the mode's dtype.
    Returns the fused run's tensors, for the caller's own checks of which ones exist."""
    from st_adapter_fast import ops, parity

    if case.variant.drop_path > 0:
        torch.manual_seed(parity.DROP_PATH_SEED)
        draw = ops.drop_path_draw(case.batch, case.variant.drop_path, "cpu")
        assert (draw == 0).any() and (draw == 1).any(), draw
    ref64 = parity.reference64(case, inputs, device=device)
    mode = parity.DTYPE_MODES[mode_name]
    got = parity.run_mode(case, inputs, "triton", mode, device)
    eager = parity.run_mode(case, inputs, "reference", mode, device)
    assert set(got) == set(ref64)
    errors = parity.compare(got, ref64, eager, mode.dtype, exempt=parity.backstop_exempt(case))
    assert all(e.passed for e in errors), parity.format_failures(errors, label or case.label(), mode_name)
    return got
