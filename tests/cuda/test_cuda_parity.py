"""The CUDA backend (csrc/) against the float64 reference: outputs and every gradient, with the
parity rule of tests/helpers.py.

GPU tests (skipped without CUDA): the parity grid of docs/design.md §6 in fp32/fp16/bf16, halo
recompute (clips split into short frame runs), kt 7 and 9, autocast, a seeded fuzz, bitwise
determinism of the gradients, torch.compile and opcheck through the registered op.
CPU twins (every run): the backend is registered, and every reason it refuses a call (CPU
tensors, spatial kernels, kt > 9, dtypes, no CUDA torch / nvcc / sources) is raised with a
message that says why; the index arithmetic and the kernels' compilation are checked by
test_cuda_host_index.py and test_cuda_compile.py.
"""

import random

import pytest
import torch

import st_adapter_fast
from st_adapter_fast import backends
from st_adapter_fast.backends import cuda as cuda_backend

from helpers import Case, assert_parity, covering_grid, make_inputs, reference64, requires_cuda, run

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


GRID = covering_grid()


@pytest.fixture(autouse=True)
def _extension_or_skip(request):
    """On a GPU machine without a toolchain (no nvcc, CPU-only torch headers) the GPU tests skip
    with the reason; a build that was attempted and failed is a test failure, not a skip."""
    if not request.node.originalname.endswith("_cuda") or not torch.cuda.is_available():
        return
    if cuda_backend.load_extension() is None:
        err = cuda_backend.extension_error()
        if "JIT build failed" in err:
            pytest.fail(err)
        pytest.skip(err)


def _check(case: Case, dtype: torch.dtype, seed: int = 0, **run_kwargs):
    inputs = make_inputs(case, seed)
    ref = reference64(case, inputs)
    eager = run(case, inputs, "reference", dtype, "cuda", **run_kwargs)
    got = run(case, inputs, "cuda", dtype, "cuda", **run_kwargs)
    errs = assert_parity(got, ref, eager, run_kwargs.get("autocast") or dtype, case.label())
    print(case.label(), dtype, {k: f"{v:.2e}" for k, v in errs.items()})
    return got


# ------------------------------------------------------------------------------ GPU
@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", GRID, ids=Case.label)
def test_parity_grid_cuda(case, dtype):
    _check(case, dtype)


@requires_cuda
@pytest.mark.parametrize("frames_per_run", [1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_halo_recompute_cuda(frames_per_run, dtype, monkeypatch):
    """T larger than a block's run of frames: every run recomputes KT//2 halo frames per side."""
    monkeypatch.setenv("ST_ADAPTER_FRAMES_PER_PROGRAM", str(frames_per_run))
    for kt in (3, 5, 9):
        _check(Case(batch=2, frames=11, grid=(5, 5), channels=40, adapter_channels=72, kernel=(kt, 1, 1)), dtype)


@requires_cuda
@pytest.mark.parametrize("config", [c.index for c in cuda_backend.gemm_configs()])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_gemm_configs_cuda(config, dtype, monkeypatch):
    """Each GEMM config (ST_ADAPTER_CUDA_GEMM_CONFIG), with more K steps than stages; the
    CPU twin is test_cuda_emulated.py's test_emulated_gemm_configs."""
    monkeypatch.setenv("ST_ADAPTER_CUDA_GEMM_CONFIG", str(config))
    _check(Case(batch=2, frames=5, grid=(6, 6), prefix=1, channels=136, adapter_channels=200, kernel=(3, 1, 1)), dtype)


@requires_cuda
def test_launch_budget_cuda():
    """The binding launches 2 kernels forward and 6 backward, every cast and reduction included
    (profiled; the CPU twin is test_cuda_emulated.py's test_launch_budget)."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator(device="cpu").manual_seed(0)
    t, p, c, ca, kt = 8, 1, 256, 128, 3
    x = torch.randn(4 * t, p + 196, c, generator=gen).cuda().bfloat16()
    wd, bd = (torch.randn(ca, c, generator=gen) * c ** -0.5).cuda().bfloat16(), torch.zeros(ca, device="cuda").bfloat16()
    taps, bc = torch.randn(ca, kt, generator=gen).cuda().bfloat16(), torch.zeros(ca, device="cuda").bfloat16()
    wu, bu = (torch.randn(c, ca, generator=gen) * ca ** -0.5).cuda().bfloat16(), torch.zeros(c, device="cuda").bfloat16()
    args = (t, p, wd, bd, taps, bc, wu, bu)
    cuda_backend.adapter_backward(x, x, *args)  # build, warm up
    torch.cuda.synchronize()
    for name, fn, most in (("fwd", lambda: cuda_backend.adapter_forward(x, *args), 2),
                           ("bwd", lambda: cuda_backend.adapter_backward(x, x, *args), 6)):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            out = fn()
            torch.cuda.synchronize()
        kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        assert 1 <= len(kernels) <= most, f"{name}: {len(kernels)} launches: {kernels}"
    assert all(g.dtype == torch.bfloat16 for g in out[1:] if g is not None)


@requires_cuda
@pytest.mark.parametrize("kt", [7, 9])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_wide_temporal_kernels_cuda(kt, dtype):
    _check(Case(batch=1, frames=10, grid=(6, 6), prefix=2, channels=20, adapter_channels=70, kernel=(kt, 1, 1)),
           dtype)


@requires_cuda
@pytest.mark.parametrize("autocast,x_dtype", [(torch.float16, torch.float32), (torch.float16, torch.float16),
                                              (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)],
                         ids=str)
def test_autocast_cuda(autocast, x_dtype):
    """Official recipe: fp32 parameters under autocast; fp32 x is cast to the weights' dtype on load."""
    case = Case(batch=2, frames=4, grid=(5, 5), channels=24, adapter_channels=20)
    got = _check(case, x_dtype, autocast=autocast, param_dtype=torch.float32)
    assert got["out"].shape == (8, 26, 24)


@requires_cuda
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_fp32_is_ieee_regardless_of_tf32_cuda(allow_tf32):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        _check(Case(batch=2, frames=8, grid=(7, 7), channels=96, adapter_channels=48), torch.float32)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@requires_cuda
@pytest.mark.parametrize("name,shape", [("A", (16, 8, 14, 768, 384)), ("B", (8, 8, 16, 1024, 512)),
                                        ("C", (4, 32, 14, 768, 384))])
def test_target_shapes_cuda(name, shape):
    b, t, side, c, ca = shape
    _check(Case(batch=b, frames=t, grid=(side, side), channels=c, adapter_channels=ca), torch.bfloat16)


@requires_cuda
def test_fuzz_cuda():
    """Seeded random shapes, kt, prefixes, dtypes, strides and biases."""
    rng = random.Random(1234)
    for i in range(24):
        h, w = rng.randint(1, 9), rng.randint(1, 9)
        case = Case(
            batch=rng.randint(1, 3), frames=rng.choice([1, 2, 3, 5, 8, 13, 33]), grid=(h, w),
            prefix=rng.randint(0, 3), channels=rng.choice([8, 24, 72, 100, 136]),
            adapter_channels=rng.choice([8, 16, 40, 65, 130]), kernel=(rng.choice([1, 3, 5, 7, 9]), 1, 1),
            noncontiguous=rng.random() < 0.3, bias=rng.random() < 0.8,
        )
        _check(case, rng.choice(DTYPES), seed=i)


@requires_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gradients_are_bitwise_deterministic_cuda(dtype):
    """Fixed-order reductions, no float atomics: two runs give bitwise-equal gradients (shape big
    enough for several token splits in the weight gradients and several frame runs)."""
    case = Case(batch=2, frames=16, grid=(14, 14), channels=256, adapter_channels=128)
    inputs = make_inputs(case)
    first = run(case, inputs, "cuda", dtype, "cuda")
    second = run(case, inputs, "cuda", dtype, "cuda")
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name} differs between runs"


@requires_cuda
def test_torch_compile_fullgraph_cuda():
    torch._dynamo.reset()
    m = st_adapter_fast.STAdapter(64, 32, backend="cuda", grid_size=(4, 4)).cuda()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2 * 4, 17, 64, device="cuda")
    compiled = torch.compile(m, fullgraph=True)
    torch.testing.assert_close(compiled(x, 4), m(x, 4), rtol=0, atol=0)


@requires_cuda
@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_cuda(bias):
    case = Case(batch=2, frames=3, grid=(3, 3), channels=24, adapter_channels=16, bias=bias)
    inputs = make_inputs(case)
    x = inputs["x"].float().cuda().requires_grad_()
    params = [inputs[n].float().cuda().requires_grad_() if inputs[n] is not None else None for n in
              ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter.default,
                          (x, *params, case.frames, case.prefix, "cuda"))
    grad = torch.randn_like(x)
    detached = [p.detach() if p is not None else None for p in params]
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter_backward.default,
                          (grad, x.detach(), *detached, case.frames, case.prefix, "cuda"))


# ------------------------------------------------------------------------- CPU twins
def test_cuda_backend_is_registered():
    assert backends.get_backend("cuda") is cuda_backend.BACKEND
    assert "cuda" in st_adapter_fast.available_backends()


@pytest.mark.parametrize(
    "x_dtype,w_dtype,kernel,expect",
    [
        (torch.float32, torch.float32, (3, 1, 1), "CUDA tensors"),
        (torch.float32, torch.float32, (3, 3, 3), "only temporal kernels"),
        (torch.float32, torch.float32, (11, 1, 1), "up to 9"),
        (torch.float64, torch.float64, (3, 1, 1), "float32/float16/bfloat16"),
        (torch.bfloat16, torch.float16, (3, 1, 1), "cast only float32"),
    ],
)
def test_unavailable_reasons(x_dtype, w_dtype, kernel, expect):
    x = torch.zeros(2, 5, 8, dtype=x_dtype)
    reason = cuda_backend.unavailable_reason(x, kernel, w_dtype)
    assert reason is not None and expect in reason, reason


def test_explicit_cuda_backend_on_cpu_raises_with_reason():
    case = Case(batch=1, frames=2, grid=(2, 2))
    inputs = make_inputs(case)
    params = [inputs[n].float() if inputs[n] is not None else None for n in
              ("fc1_weight", "fc1_bias", "conv_weight", "conv_bias", "fc2_weight", "fc2_bias")]
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run this call: .*CUDA tensors"):
        st_adapter_fast.st_adapter(inputs["x"].float(), 2, *params, backend="cuda")


def test_jit_build_reasons(monkeypatch, tmp_path):
    """Where the extension can neither be imported nor JIT-built, the reason names the cause."""
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "CPU build" in cuda_backend._jit_unavailable_reason()
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cuda_backend, "CSRC_DIR", tmp_path)
    assert "sources are not installed" in cuda_backend._jit_unavailable_reason()
    monkeypatch.undo()
    if torch.version.cuda is not None:
        return
    from torch.utils import cpp_extension

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    monkeypatch.setattr(cuda_backend.shutil, "which", lambda name: None)
    assert "nvcc was not found" in cuda_backend._jit_unavailable_reason()


def test_load_extension_reports_why_on_cpu_torch(monkeypatch):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: the extension may well load")
    monkeypatch.setattr(cuda_backend, "_EXT", None)
    monkeypatch.setattr(cuda_backend, "_EXT_ERROR", None)
    assert cuda_backend.load_extension() is None
    err = cuda_backend.extension_error()
    assert "st_adapter_fast._cuda is not built" in err and "CPU build" in err


def test_import_is_cheap():
    """Importing the backend never builds or imports the C++ toolchain helpers."""
    import subprocess
    import sys

    code = ("import sys, st_adapter_fast.backends.cuda as cb; "
            "print(cb._EXT is None and cb._EXT_ERROR is None, 'torch.utils.cpp_extension' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "False"]
