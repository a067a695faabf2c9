"""Parity grid of docs/design.md §6: the fused Triton op against the float64 reference, for the
output and the gradient of x and of every parameter.

What runs where:
- CPU (CI): the Triton kernels under TRITON_INTERPRET=1. fp32 and fp16 are exact emulations;
  the interpreter truncates fp32 -> bf16 casts where GPUs round to nearest-even, so the kernels
  round explicitly when interpreting (kernels/_common.py _cast).
  For bf16 the interpreter's tl.dot multiplies raw bit patterns (triton-lang/triton#11584), so
  under the interpreter the kernels round operands to bf16 and multiply them in fp32 -- the
  same exact-product, fp32-accumulate math a bf16 tensor-core MMA does. Everything around the
  dot (loads, casts, the conv window, bias, stores in bf16) is the GPU code path.
- GPU (test_parity_grid_gpu, skipped without CUDA): the same grid with the real bf16/fp16 MMAs,
  TF32 off and on, plus the target shapes of docs/design.md §5.
"""


import pytest
import torch

from helpers import (
    Case,
    covering_grid,
    TOLERANCES,
    assert_parity,
    fused_device,
    make_inputs,
    reference64,
    requires_cuda,
    requires_interpreter,
    run,
)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


GRID = covering_grid()


def _check(case: Case, dtype: torch.dtype, device: str, seed: int = 0):
    inputs = make_inputs(case, seed)
    ref = reference64(case, inputs)
    eager = run(case, inputs, "reference", dtype, device)
    got = run(case, inputs, "triton", dtype, device)
    errs = assert_parity(got, ref, eager, dtype, case.label())
    print(case.label(), dtype, {k: f"{v:.2e}" for k, v in errs.items()})


@requires_interpreter
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRID, ids=Case.label)
def test_parity_grid_interpreter(case, dtype):
    _check(case, dtype, "cpu")


@requires_interpreter
@pytest.mark.parametrize("frames_per_program", [2, 3, 5])
def test_halo_recompute_interpreter(frames_per_program, monkeypatch):
    """Clips split into runs of frames: each run recomputes KT//2 halo frames on both sides."""
    monkeypatch.setenv("ST_ADAPTER_FRAMES_PER_PROGRAM", str(frames_per_program))
    for kt in (3, 5):
        _check(Case(batch=2, frames=11, grid=(2, 3), kernel=(kt, 1, 1)), torch.float32, "cpu")


@requires_interpreter
@pytest.mark.parametrize("kt", [7, 9])
def test_wide_temporal_kernels_interpreter(kt):
    _check(Case(batch=1, frames=10, grid=(2, 2), channels=20, adapter_channels=24, kernel=(kt, 1, 1)),
           torch.float32, "cpu")


def _autocast_check(device: str, autocast: torch.dtype, x_dtype: torch.dtype):
    """Official recipe: fp32 adapter parameters under autocast, activations in x_dtype.
    Parameter grads must come back in fp32 and the output in x's dtype."""
    case = Case(batch=2, frames=4, grid=(2, 3), channels=24, adapter_channels=20)
    inputs = make_inputs(case)
    ref = reference64(case, inputs)
    eager = run(case, inputs, "reference", x_dtype, device, autocast=autocast, param_dtype=torch.float32)
    got = run(case, inputs, "triton", x_dtype, device, autocast=autocast, param_dtype=torch.float32)
    assert_parity(got, ref, eager, autocast, f"autocast {autocast} x {x_dtype}")


@requires_interpreter
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_autocast_interpreter(x_dtype):
    _autocast_check("cpu", torch.bfloat16, x_dtype)


@requires_interpreter
def test_autocast_dtypes_interpreter():
    x = torch.randn(4, 7, 16, dtype=torch.float16)
    m = __import__("st_adapter_fast").STAdapter(16, 8, backend="triton", grid_size=(2, 3))
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.autocast("cpu", dtype=torch.float16):
        out = m(x.requires_grad_(), 2)
    out.float().sum().backward()
    assert out.dtype == torch.float16
    assert all(p.grad.dtype == torch.float32 for p in m.parameters())
    assert x.grad.dtype == torch.float16


@requires_interpreter
def test_inplace_matches_official_interpreter():
    """inplace=True adds into x[:, P:] and returns x itself, like the official module."""
    case = Case(batch=1, frames=3, grid=(2, 2))
    inputs = make_inputs(case)
    params = [inputs[n].float() if inputs[n] is not None else None for n in
              ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    from st_adapter_fast import st_adapter

    base = inputs["x"].float()
    x = base.clone()
    out_of_place = st_adapter(x, 3, *params, grid_size=(2, 2), backend="triton")
    assert torch.equal(x, base), "out-of-place call mutated its input"
    returned = st_adapter(x, 3, *params, grid_size=(2, 2), backend="triton", inplace=True)
    assert returned is x
    torch.testing.assert_close(x, out_of_place, rtol=0, atol=0)
    # with autograd through a non-leaf x, as inside a ViT block
    leaf = base.clone().requires_grad_()
    y = leaf * 1.0
    st_adapter(y, 3, *params, grid_size=(2, 2), backend="triton", inplace=True).sum().backward()
    leaf2 = base.clone().requires_grad_()
    st_adapter(leaf2, 3, *params, grid_size=(2, 2), backend="triton").sum().backward()
    torch.testing.assert_close(leaf.grad, leaf2.grad)


# ----------------------------------------------------------------------------- GPU twins
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRID, ids=Case.label)
def test_parity_grid_gpu(case, dtype):
    _check(case, dtype, "cuda")


@requires_cuda
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_follows_torch_tf32_setting_gpu(allow_tf32):
    """tl.dot would use TF32 for fp32 by default; we follow torch's matmul setting."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        _check(Case(batch=2, frames=8, grid=(7, 7), channels=96, adapter_channels=48), torch.float32, "cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@requires_cuda
@pytest.mark.parametrize("name,shape", [("A", (16, 8, 14, 768, 384)), ("C", (4, 32, 14, 768, 384))])
def test_target_shapes_gpu(name, shape):
    b, t, side, c, ca = shape
    _check(Case(batch=b, frames=t, grid=(side, side), channels=c, adapter_channels=ca), torch.bfloat16, "cuda")


@requires_cuda
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.float16], ids=str)
def test_autocast_gpu(x_dtype):
    _autocast_check("cuda", torch.float16, x_dtype)


def test_tolerance_table_is_tight():
    """The backstop must be able to fail: a 10% error is rejected for every dtype."""
    for dtype, tol in TOLERANCES.items():
        assert tol.backstop < 0.1 and tol.floor < tol.backstop, dtype
    ref = {"out": torch.ones(4, dtype=torch.float64)}
    bad = {"out": torch.full((4,), 1.1, dtype=torch.float64)}
    for dtype in TOLERANCES:
        with pytest.raises(AssertionError):
            assert_parity(bad, ref, ref, dtype)


def test_device_used_for_fused_tests():
    assert fused_device() in ("cpu", "cuda")
