"""Determinism under torch.use_deterministic_algorithms(True).

The fused backends reduce over tokens with fixed-order split partials (no float atomics), so the
op runs under deterministic mode without raising, two runs give bitwise-equal outputs and
gradients, and deterministic mode changes nothing (same kernels, same bits). Deterministic mode
also fills torch.empty outputs with NaN (torch.utils.deterministic.fill_uninitialized_memory),
so a kernel that left any workspace element unwritten would show up here as NaN.

For the reference backend the test records which of the two allowed outcomes PyTorch's own ops
give on this device: bitwise-reproducible, or the standard RuntimeError PyTorch raises for an op
without a deterministic implementation (on CUDA, e.g. cuBLAS without CUBLAS_WORKSPACE_CONFIG).
"""

from __future__ import annotations

import pytest
import torch

import st_adapter_fast
from helpers import fused_device, triton_interpreter_on
from tiny_clip import fused_backend_or_skip

fused_available = pytest.mark.skipif(
    not (torch.cuda.is_available() or triton_interpreter_on()),
    reason="the Triton backend needs a CUDA GPU or TRITON_INTERPRET=1 on CPU",
)

# PyTorch's wording for ops that cannot run deterministically (aten/src/ATen/Context.cpp)
DETERMINISM_ERRORS = ("does not have a deterministic implementation", "CUBLAS_WORKSPACE_CONFIG")


@pytest.fixture
def deterministic():
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def _inputs(device, dtype, b=2, t=4, grid=(7, 7), c=32, ca=24, seed=0):
    """Big enough that the token reductions are split: 392 spatial tokens give 2 fp32 wgrad
    splits at the interpreter's tile sizes and B * s-blocks conv-backward partials."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(b * t, 1 + grid[0] * grid[1], c, generator=gen)
    grad_out = torch.randn(x.shape, generator=gen)
    params = [
        torch.randn(ca, c, generator=gen) * c ** -0.5, torch.randn(ca, generator=gen) * 0.5,
        torch.randn(ca, 1, 3, 1, 1, generator=gen) * 0.5, torch.randn(ca, generator=gen) * 0.5,
        torch.randn(c, ca, generator=gen) * ca ** -0.5, torch.randn(c, generator=gen) * 0.5,
    ]
    return x.to(device, dtype), grad_out.to(device, dtype), [p.to(device, dtype) for p in params], t, grid


def _run(inputs, backend):
    x0, grad_out, params0, t, grid = inputs
    x = x0.clone().requires_grad_(True)
    params = [p.clone().requires_grad_(True) for p in params0]
    out = st_adapter_fast.st_adapter(x, t, *params, grid_size=grid, backend=backend)
    out.backward(grad_out)
    return {"out": out.detach(), "x": x.grad, **{f"param{i}": p.grad for i, p in enumerate(params)}}


def _assert_bitwise(a, b, what):
    differ = [n for n in a if not torch.equal(a[n], b[n])]
    assert not differ, f"{what}: not bitwise equal: {differ}"
    nan = [n for n in a if not torch.isfinite(a[n]).all()]
    assert not nan, f"{what}: non-finite values (unwritten workspace?) in {nan}"


@fused_available
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_op_is_deterministic(dtype, backend, deterministic):
    fused_backend_or_skip(backend, fused_device(), dtype)
    inputs = _inputs(fused_device(), dtype)
    first = _run(inputs, backend)  # must not raise under deterministic mode
    second = _run(inputs, backend)
    _assert_bitwise(first, second, f"{backend}: two deterministic-mode runs ({dtype})")

    torch.use_deterministic_algorithms(False)
    default_mode = _run(inputs, backend)
    _assert_bitwise(first, default_mode, f"{backend}: deterministic vs default mode ({dtype})")


@fused_available
def test_weight_grad_split_reduction_is_fixed_order():
    """The split-N wgrad reduction gives the same bits run after run whatever the split count it
    picks, and different split counts agree to fp32 rounding (same sum, different order)."""
    from st_adapter_fast.kernels.adapter_bwd import weight_grad

    gen = torch.Generator().manual_seed(4)
    device = fused_device()
    s, n_frames = 49, 8
    a = torch.randn(n_frames, 1 + s, 40, generator=gen).to(device)
    b = torch.randn(n_frames, 1 + s, 24, generator=gen).to(device)
    per_split = {}
    for splits in (1, 3):
        runs = [weight_grad(a, b, torch.float32, n_frames * s, s, 1, True, splits=splits) for _ in range(2)]
        for (dw0, db0), (dw1, db1) in zip(runs, runs[1:]):
            assert torch.equal(dw0, dw1) and torch.equal(db0, db1), f"splits={splits}: runs differ"
        per_split[splits] = runs[0]
    want_dw = torch.einsum("fli,flj->ij", a[:, 1:].double(), b[:, 1:].double())
    for splits, (dw, db) in per_split.items():
        torch.testing.assert_close(dw.double(), want_dw, rtol=1e-5, atol=1e-5, msg=f"splits={splits}")
        torch.testing.assert_close(db.double(), a[:, 1:].double().sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_reference_is_deterministic_or_raises_the_standard_error(deterministic):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    inputs = _inputs(device, torch.float32)
    try:
        first = _run(inputs, "reference")
    except RuntimeError as err:
        assert any(s in str(err) for s in DETERMINISM_ERRORS), f"unexpected error: {err}"
        assert device == "cuda", f"PyTorch's CPU ops are deterministic, yet: {err}"
        return
    _assert_bitwise(first, _run(inputs, "reference"), "reference, two deterministic-mode runs")
