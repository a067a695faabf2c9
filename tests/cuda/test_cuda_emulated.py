"""CPU twin of the CUDA parity tests: the real kernel code of csrc/*.cu, compiled with g++ against
csrc/cpu_emulation.h (a block's 256 threads as fibers, __syncthreads and warp barriers as fiber
switches; ldmatrix and mma.sync m16n8k16 lane by lane with the PTX fragment layouts, exact-operand
fp32 accumulation; cp.async copies that land only when their group is waited for), held to the
same parity rule as every backend.

What this covers without a GPU: every kernel's tiling and index math, the register window and
halo, dwc/dbc partials, split-token weight gradients with fixed-order sums, prefix passthrough,
strided inputs, all dtype pairs (fp32 x with fp16/bf16 weights included), the launch
sequence of binding.cpp (restated in Python below, with the same buffers and the same views:
tokens, weights, conv shape), the dispatch table (asked, not restated), and the grid-limit check.
What it cannot cover: GPU timing and races, the HMMA summation order, and binding.cpp itself
(tests/cuda/test_cuda_build.py compiles it; test_cuda_parity.py runs it on a GPU).
"""

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import st_adapter_fast
from st_adapter_fast import backends
from st_adapter_fast.backends import cuda as cuda_backend

from helpers import Case, assert_parity, make_inputs, reference64, run

CSRC = Path(__file__).resolve().parents[2] / "csrc"
KERNEL_FILES = ("down_conv_fwd.cu", "conv_bwd.cu", "up_residual.cu", "wgrad.cu")
CXX = shutil.which("g++")
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
# SM count the emulated launch policy assumes: small, so short frame runs (halo) and several
# weight-gradient splits happen even at test sizes (the Triton interpreter assumes 4 too)
EMU_SMS = 4
CUDA_ERROR_INVALID_VALUE = 1
CUDA_ERROR_INVALID_CONFIGURATION = 9  # cudaErrorInvalidConfiguration, as CUDA numbers it

pytestmark = pytest.mark.skipif(CXX is None, reason="needs g++ (C++20) to build the CPU emulation")

_LIB = None


def _lib(tmp_dir: Path):
    global _LIB
    if _LIB is None:
        so = tmp_dir / "libsta_emu.so"
        cmd = [CXX, "-std=c++20", "-O1", "-fno-strict-aliasing", "-DSTA_CPU_EMULATION", "-fPIC", "-shared", "-pthread",
               "-Wno-unknown-pragmas", "-I", str(CSRC), "-x", "c++",
               *[str(CSRC / f) for f in KERNEL_FILES], str(CSRC / "cpu_emulation_api.cpp"), "-o", str(so)]
        subprocess.run(cmd, check=True, capture_output=True, text=True)
        lib = ctypes.CDLL(str(so))
        i64, i32, vp = ctypes.c_int64, ctypes.c_int, ctypes.c_void_p
        arr = ctypes.POINTER(i64)  # the views: tokens {P, stride_f, stride_l, stride_c}, weights
        # {stride_n, stride_k}, conv shape {B, T, S, C, Ca, KT, frames_per_run, n_whole_rows}
        # the last argument of every launch: the 16-bit GEMM config index (0 = default)
        lib.sta_emu_down_conv.argtypes = [vp, i32, arr, vp, arr, i32, vp, vp, vp, vp, vp, arr, i32]
        lib.sta_emu_conv_bwd.argtypes = [vp, i32, arr, vp, arr, i32, vp, vp, vp, vp, vp, arr, i32]
        lib.sta_emu_up_residual.argtypes = [vp, i32, arr, vp, vp, arr, i32, vp, vp, i64, i64, i64, i64, i32]
        lib.sta_emu_weight_grad.argtypes = [vp, i32, arr, vp, i32, arr, i32, i64, i64, i64, i64, i64, i64, vp, vp,
                                            i32]
        lib.sta_emu_kt_supported.argtypes = [i32]
        lib.sta_emu_gemm_config_supported.argtypes = [i32]
        lib.sta_emu_dtypes_supported.argtypes = [i32, i32, ctypes.POINTER(i32)]
        lib.sta_emu_sum_partials.argtypes = [vp, vp, i64, i64]
        lib.sta_emu_sum_partials_many.argtypes = [i32, ctypes.POINTER(vp), ctypes.POINTER(vp), arr, i32]
        lib.sta_emu_conv_plan.argtypes = [i32, i64, i64, i64, i64, i64, i64, i32, arr]
        lib.sta_emu_conv_grid.argtypes = [arr, i32, arr]
        lib.sta_emu_gemm_config_tiles.argtypes = [i32, i32, ctypes.POINTER(i32)]
        lib.sta_emu_launch_count.restype = i64
        lib.sta_emu_wgrad_split.argtypes = [i64, i64, i64, i64, ctypes.POINTER(i64)]
        _LIB = lib
    return _LIB


def _dtypes_supported(lib, compute, *operands):
    """Whether the dispatch table has kernels for these operand dtypes under this compute dtype."""
    if compute not in DTYPE_CODE or any(o not in DTYPE_CODE for o in operands):
        return False
    codes = (ctypes.c_int * len(operands))(*(DTYPE_CODE[o] for o in operands))
    return lib.sta_emu_dtypes_supported(DTYPE_CODE[compute], len(operands), codes) == 1


def _ptr(t):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _ok(rc):
    assert rc == 0, f"emulated launch failed with {rc}"


# --------------------------------------------------------- binding.cpp, restated for ctypes
def _conv_plan(lib, t, kt, s, ca, b, requested):
    """backends/cuda.py call_plan (forced runs, else the occupancy plan window_plan for EMU_SMS
    SMs: whole-clip row blocks then split ones) as binding.cpp's pick_plan receives it."""
    env = os.environ.get("ST_ADAPTER_FRAMES_PER_PROGRAM")
    forced = int(requested or (env or 0))
    if forced:
        return min(forced, t), 0
    rows = cuda_backend.gemm_configs()[cuda_backend.gemm_config()].conv_rows(kt)
    return cuda_backend.window_plan(kt, b, t, s, ca, rows, EMU_SMS)


def test_binding_fallback_plan(emulated):
    """binding.cpp's own plan (frames_per_run = 0) from the dispatch table's tile rows equals
    backends/cuda.py conv_plan for every config."""
    out = (ctypes.c_int64 * 2)()
    for cfg in cuda_backend.gemm_configs():
        for kt, b, t, s, ca in ((3, 16, 8, 196, 384), (3, 4, 32, 196, 384), (9, 1, 17, 7, 40)):
            emulated.sta_emu_conv_plan(kt, b, t, s, ca, 0, 132, cfg.index, out)
            assert tuple(out) == cuda_backend.conv_plan(cfg.conv_rows(kt), kt, b, t, s, ca, 0, 132)


class _Finalize:
    """binding.cpp's Finalize: every fp32 partial of the backward summed and cast to the
    parameters' dtype in one launch."""

    def __init__(self):
        self.parts, self.outs, self.n_parts = [], [], []

    def add(self, part, out, n_parts):
        self.parts.append(part)
        self.outs.append(out)
        self.n_parts.append(n_parts)

    def launch(self, lib):
        n = len(self.parts)
        if n == 0:
            return
        vps = ctypes.c_void_p * n
        _ok(lib.sta_emu_sum_partials_many(n, vps(*(t.data_ptr() for t in self.parts)),
                                          vps(*(t.data_ptr() for t in self.outs)),
                                          _i64s(*self.n_parts, *(t.numel() for t in self.outs)),
                                          DTYPE_CODE[self.outs[0].dtype]))


def _i64s(*vals):
    return (ctypes.c_int64 * len(vals))(*vals)


def _tokens(t, s, p):
    """binding.cpp's token_view: a token tensor (F, L, K), or a flat (N, K) buffer with P = 0."""
    if t.dim() == 3:
        return _i64s(p, *t.stride())
    return _i64s(0, s * t.stride(0), *t.stride())


def _weight(w, transposed=False):
    """binding.cpp's weight_view: W(n, k) = w[n, k], or w[k, n] when transposed."""
    return _i64s(*(reversed(w.stride()) if transposed else w.stride()))


def _conv_shape(x, t, p, taps, plan):
    f, seq_len, c = x.shape
    ca, kt = taps.shape
    return _i64s(f // t, t, seq_len - p, c, ca, kt, *plan)


def _down_conv(lib, x, t, p, wd, bd, taps, bc, g, h, plan):
    _ok(lib.sta_emu_down_conv(_ptr(x), DTYPE_CODE[x.dtype], _tokens(x, x.shape[1] - p, p), _ptr(wd), _weight(wd),
                              DTYPE_CODE[wd.dtype], _ptr(bd), _ptr(taps), _ptr(bc), _ptr(g), _ptr(h),
                              _conv_shape(x, t, p, taps, plan), cuda_backend.gemm_config()))


def _up_residual(lib, res, p, a, w, transposed, bias, out):
    f, seq_len, nout = out.shape
    _ok(lib.sta_emu_up_residual(_ptr(res), DTYPE_CODE[res.dtype], _tokens(res, seq_len - p, p), _ptr(a), _ptr(w),
                                _weight(w, transposed), DTYPE_CODE[w.dtype], _ptr(bias), _ptr(out), f, seq_len - p,
                                a.shape[1], nout, cuda_backend.gemm_config()))


def _weight_grad(lib, a, b, s, p, n, compute, with_bias, fin):
    i_dim, j_dim = a.shape[-1], b.shape[-1]
    dw = torch.zeros(i_dim, j_dim, dtype=compute)
    db = torch.zeros(i_dim, dtype=compute) if with_bias else None
    if n == 0:
        return dw, db
    split = (ctypes.c_int64 * 2)()
    lib.sta_emu_wgrad_split(n, i_dim, j_dim, EMU_SMS, split)
    splits, tps = split[0], split[1]
    dw_part = torch.empty(splits, i_dim, j_dim)
    db_part = torch.empty(splits, i_dim) if with_bias else None
    _ok(lib.sta_emu_weight_grad(_ptr(a), DTYPE_CODE[a.dtype], _tokens(a, s, p), _ptr(b), DTYPE_CODE[b.dtype],
                                _tokens(b, s, p), DTYPE_CODE[compute], s, n, i_dim, j_dim, splits, tps,
                                _ptr(dw_part), _ptr(db_part), cuda_backend.gemm_config()))
    fin.add(dw_part, dw, splits)
    if with_bias:
        fin.add(db_part, db, splits)
    return dw, db


def _contig(t):
    return None if t is None else t.contiguous()


def emu_forward(lib, x, t, p, wd, bd, taps, bc, wu, bu, *, frames_per_prog=None):
    taps, bd, bc, bu = taps.contiguous(), _contig(bd), _contig(bc), _contig(bu)
    f, seq_len, c = x.shape
    s, (ca, kt) = seq_len - p, taps.shape
    out = torch.empty(f, seq_len, c, dtype=x.dtype)
    g = torch.empty(f * s, ca, dtype=wd.dtype)
    if out.numel() == 0:
        return out
    if g.numel():
        _down_conv(lib, x, t, p, wd, bd, taps, bc, g, None, _conv_plan(lib, t, kt, s, ca, f // t, frames_per_prog))
    _up_residual(lib, x, p, g, wu, False, bu, out)
    return out


def emu_backward(lib, dout, x, t, p, wd, bd, taps, bc, wu, bu, *, frames_per_prog=None):
    taps, bd, bc = taps.contiguous(), _contig(bd), _contig(bc)
    f, seq_len, c = x.shape
    s, (ca, kt) = seq_len - p, taps.shape
    b, n = f // t, f * s
    plan = _conv_plan(lib, t, kt, s, ca, b, frames_per_prog)
    g = torch.empty(n, ca, dtype=wd.dtype)
    h = torch.empty(n, ca, dtype=wd.dtype)
    if n:
        _down_conv(lib, x, t, p, wd, bd, taps, bc, g, h, plan)
    fin = _Finalize()
    dh = torch.empty(n, ca, dtype=wd.dtype)
    # empty, not zeros: the finalize writes every element (NaN if it missed one)
    dwc = torch.full((ca, kt), float("nan"), dtype=wd.dtype) if n else torch.zeros(ca, kt, dtype=wd.dtype)
    dbc = torch.full((ca,), float("nan"), dtype=wd.dtype) if n else torch.zeros(ca, dtype=wd.dtype)
    if n:
        grid = (ctypes.c_int64 * 2)()
        lib.sta_emu_conv_grid(_conv_shape(x, t, p, taps, plan), cuda_backend.gemm_config(), grid)
        parts = grid[1]
        dwc_part = torch.empty(parts, ca, kt)
        dbc_part = torch.empty(parts, ca)
        _ok(lib.sta_emu_conv_bwd(_ptr(dout), DTYPE_CODE[dout.dtype], _tokens(dout, s, p), _ptr(wu),
                                 _weight(wu, transposed=True), DTYPE_CODE[wd.dtype], _ptr(taps), _ptr(h), _ptr(dh),
                                 _ptr(dwc_part), _ptr(dbc_part), _conv_shape(x, t, p, taps, plan),
                                 cuda_backend.gemm_config()))
        fin.add(dwc_part, dwc, parts)
        fin.add(dbc_part, dbc, parts)
    dx = torch.empty(f, seq_len, c, dtype=dout.dtype)
    if dx.numel():
        _up_residual(lib, dout, p, dh, wd, True, None, dx)
    dwu, dbu = _weight_grad(lib, dout, g, s, p, n, wd.dtype, bu is not None, fin)
    dwd, dbd = _weight_grad(lib, dh, x, s, p, n, wd.dtype, bd is not None, fin)
    fin.launch(lib)
    return dx, dwd, dbd, dwc, (dbc if bc is not None else None), dwu, dbu


# ------------------------------------------------------------------- test backend
@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    lib = _lib(tmp_path_factory.mktemp("cuda_emulation"))

    def reason(x, kernel_size, dtype):  # asks the kernels' dispatch table (st_adapter_dispatch.h)
        if x.device.type != "cpu":
            return "the emulated CUDA kernels run on CPU tensors"
        if not _dtypes_supported(lib, dtype, x.dtype):
            return f"unsupported dtypes {x.dtype} / {dtype}"
        kt, kh, kw = kernel_size
        return None if (kh, kw) == (1, 1) and lib.sta_emu_kt_supported(kt) else f"unsupported kernel {kernel_size}"

    backend = backends.Backend(
        "cuda_emulated", reason,
        lambda *a, **k: emu_forward(lib, *a, **k),
        lambda *a, **k: emu_backward(lib, *a, **k),
        auto=False,
    )
    backends.register_backend(backend, replace=True)
    yield lib
    backends.unregister_backend("cuda_emulated")


def _check(case, dtype, seed=0, **kw):
    inputs = make_inputs(case, seed)
    ref = reference64(case, inputs)
    eager = run(case, inputs, "reference", dtype, "cpu", **kw)
    got = run(case, inputs, "cuda_emulated", dtype, "cpu", **kw)
    errs = assert_parity(got, ref, eager, kw.get("autocast") or dtype, case.label())
    print(case.label(), dtype, {k: f"{v:.2e}" for k, v in errs.items()})
    return got


# A covering subset (the GPU runs the full grid): every kt of the grid with T below, at and
# above a run, prefixes 0/1/2, spatial and channel counts off every block size, strided x,
# no biases, and channel counts past one 64-wide tile.
CASES = [
    Case(batch=2, frames=3, grid=(3, 3), prefix=1, channels=24, adapter_channels=40, kernel=(3, 1, 1)),
    Case(batch=1, frames=1, grid=(2, 3), prefix=0, channels=40, adapter_channels=20, kernel=(1, 1, 1)),
    Case(batch=2, frames=8, grid=(1, 7), prefix=2, channels=20, adapter_channels=36, kernel=(5, 1, 1),
         noncontiguous=True),
    Case(batch=1, frames=17, grid=(2, 5), prefix=1, channels=24, adapter_channels=40, kernel=(3, 1, 1), bias=False),
    Case(batch=1, frames=5, grid=(9, 9), prefix=1, channels=72, adapter_channels=136, kernel=(3, 1, 1)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=Case.label)
def test_emulated_kernels_parity(case, dtype, emulated):
    _check(case, dtype)


@pytest.mark.parametrize("kt", [7, 9])
def test_emulated_wide_kernels_and_halo(kt, emulated, monkeypatch):
    """kt up to 9 with clips split into runs of 2 and 3 frames (halo recompute on both sides)."""
    for fpr in (2, 3):
        monkeypatch.setenv("ST_ADAPTER_FRAMES_PER_PROGRAM", str(fpr))
        _check(Case(batch=2, frames=11, grid=(2, 3), prefix=1, channels=20, adapter_channels=24, kernel=(kt, 1, 1)),
               torch.bfloat16 if fpr == 2 else torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_emulated_mixed_window_grid(dtype, emulated, monkeypatch):
    """A window grid of whole-clip row blocks then row blocks split into runs of 2 frames (halo),
    over B*S = 75 flattened rows (row blocks of 32 for kt = 5 span clips; the last is ragged):
    the kernels and the dwc/dbc partial indexing hold for any plan, not just binding.cpp's."""
    monkeypatch.setitem(globals(), "_conv_plan", lambda *a: (2, 1))
    _check(Case(batch=3, frames=5, grid=(5, 5), prefix=1, channels=24, adapter_channels=72, kernel=(5, 1, 1)), dtype)


@pytest.mark.parametrize("config", [c.index for c in cuda_backend.gemm_configs()])
def test_emulated_gemm_configs(config, emulated, monkeypatch):
    """Each config of the table (32-deep steps x 3 stages, 16-deep x 4, 32-row window and 64-row
    up-residual tiles), with more K steps than stages (C = 72, Ca = 136: up to 9 steps of 16) so the
    cp.async ring wraps (a wait for too few groups would read a stale stage here), and B*S = 162
    rows: ragged last row blocks of 64 and 32, tiles spanning clips."""
    monkeypatch.setenv("ST_ADAPTER_CUDA_GEMM_CONFIG", str(config))
    _check(Case(batch=2, frames=3, grid=(9, 9), prefix=1, channels=72, adapter_channels=136, kernel=(3, 1, 1)),
           torch.bfloat16 if config % 2 else torch.float16)
    if config == 2:  # the fp32 kernels take the entry's tile rows too
        _check(Case(batch=2, frames=3, grid=(3, 5), prefix=1, channels=24, adapter_channels=40, kernel=(3, 1, 1)),
               torch.float32)


def test_gemm_config_table_matches_the_backend(emulated):
    """st_adapter_fast.backends.cuda.gemm_configs() (the sweep's list, the work model's tiles) is the
    compiled table: same entries, same K depth, stages and rows per block for every kt."""
    out = (ctypes.c_int * 4)()
    n = 0
    while emulated.sta_emu_gemm_config_tiles(n, 3, out) == 0:
        n += 1
    assert n == len(cuda_backend.gemm_configs())
    for cfg in cuda_backend.gemm_configs():
        for kt in (1, 3, 5, 9):
            assert emulated.sta_emu_gemm_config_tiles(cfg.index, kt, out) == 0
            assert tuple(out) == (cfg.block_k, cfg.stages, cfg.conv_rows(kt), cfg.up_block_m), (cfg, kt)


@pytest.mark.parametrize("autocast", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_autocast_fp32_activations(autocast, emulated):
    """fp32 x and dO against fp16/bf16 weights: cast on load in every kernel."""
    _check(Case(batch=2, frames=4, grid=(2, 3), channels=24, adapter_channels=20), torch.float32, autocast=autocast,
           param_dtype=torch.float32)


def test_emulated_gradients_are_deterministic(emulated):
    case = Case(batch=2, frames=6, grid=(3, 3), channels=24, adapter_channels=40)
    inputs = make_inputs(case)
    first = run(case, inputs, "cuda_emulated", torch.bfloat16, "cpu")
    second = run(case, inputs, "cuda_emulated", torch.bfloat16, "cpu")
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_emulation_runs_the_kernels_and_can_fail(emulated, monkeypatch):
    """The parity checks above go through the emulated kernels (counted), and a kernel-level
    fault -- the conv taps handed over in reverse order -- breaks parity."""
    case = Case(batch=1, frames=4, grid=(2, 2), channels=16, adapter_channels=16)
    inputs = make_inputs(case)
    calls = []
    backend = backends.get_backend("cuda_emulated")
    monkeypatch.setattr(backend, "forward", lambda *a, **k: calls.append("fwd") or emu_forward(emulated, *a, **k))
    monkeypatch.setattr(backend, "backward", lambda *a, **k: calls.append("bwd") or emu_backward(emulated, *a, **k))
    _check(case, torch.float32)
    assert calls == ["fwd", "bwd"]

    def reversed_taps_forward(x, t, p, wd, bd, taps, *rest, **k):
        return emu_forward(emulated, x, t, p, wd, bd, taps.flip(1), *rest, **k)

    monkeypatch.setattr(backend, "forward", reversed_taps_forward)
    ref = reference64(case, inputs, grads=False)
    eager = run(case, inputs, "reference", torch.float32, "cpu", grads=False)
    got = run(case, inputs, "cuda_emulated", torch.float32, "cpu", grads=False)
    with pytest.raises(AssertionError, match="out"):
        assert_parity(got, ref, eager, torch.float32)


def test_launch_budget(emulated):
    """binding.cpp's launch sequence, as restated here and run by the emulated launchers: the
    forward is 2 launches (down-conv, up-residual), the backward 6 (recompute, conv-backward,
    dgrad, two wgrads, one finalize for every fp32 partial), with several wgrad token splits and
    frame runs; the gradients come back in the weights' dtype (no cast launches after it)."""
    case = Case(batch=2, frames=8, grid=(3, 3), channels=24, adapter_channels=40)
    inputs = make_inputs(case)
    x, t, p = inputs["x"].to(torch.bfloat16), case.frames, case.prefix
    params = [v.to(torch.bfloat16) if v is not None else None for v in
              (inputs["fc1_weight"], inputs["fc1_bias"], inputs["conv_weight"].reshape(40, -1), inputs["conv_bias"],
               inputs["fc2_weight"], inputs["fc2_bias"])]
    before = emulated.sta_emu_launch_count()
    emu_forward(emulated, x, t, p, *params)
    assert emulated.sta_emu_launch_count() - before == 2
    before = emulated.sta_emu_launch_count()
    grads = emu_backward(emulated, torch.ones_like(x), x, t, p, *params, frames_per_prog=3)
    assert emulated.sta_emu_launch_count() - before == 6
    assert all(g.dtype == torch.bfloat16 for g in grads[1:] if g is not None)


def test_emulated_strided_weights(emulated):
    """fc1/fc2 weights given as transposed views (any strides reach the kernels): the weight
    tiles take the n-contiguous load order for Wd and the k-contiguous one for Wu^T."""
    gen = torch.Generator().manual_seed(3)
    t, p, c, ca, kt = 4, 1, 24, 40, 3
    x = torch.randn(2 * t, p + 6, c, generator=gen)
    wd = torch.randn(c, ca, generator=gen).t() * c ** -0.5  # (Ca, C) view, strides (1, Ca)
    wu = torch.randn(ca, c, generator=gen).t() * ca ** -0.5  # (C, Ca) view, strides (1, C)
    assert not wd.is_contiguous() and not wu.is_contiguous()
    bd, bc, bu = (torch.randn(n, generator=gen) for n in (ca, ca, c))
    taps = torch.randn(ca, kt, generator=gen) * kt ** -0.5
    dout = torch.randn(x.shape, generator=gen)

    conv_w = taps.reshape(ca, 1, kt, 1, 1)
    leaves = [v.clone().requires_grad_() for v in (x, wd, bd, conv_w, bc, wu, bu)]
    want = st_adapter_fast.reference(leaves[0], t, *leaves[1:], num_prefix_tokens=p, grid_size=(2, 3))
    want.backward(dout)

    got = emu_forward(emulated, x, t, p, wd, bd, taps, bc, wu, bu)
    torch.testing.assert_close(got, want.detach(), rtol=1e-4, atol=1e-4)
    grads = emu_backward(emulated, dout, x, t, p, wd, bd, taps, bc, wu, bu)
    expected = [leaves[0].grad, leaves[1].grad, leaves[2].grad, leaves[3].grad.reshape(ca, kt), leaves[4].grad,
                leaves[5].grad, leaves[6].grad]
    for name, g, w in zip(("dx", "dWd", "dbd", "dtaps", "dbc", "dWu", "dbu"), grads, expected):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=name)


def test_dispatch_table(emulated):
    """The one dtype x KT table: odd kt up to 9; each operand in the compute dtype or, for at most
    one operand (the activations, autocast), fp32 -- 5 pairings of one operand and 7 of two, the
    instantiation counts test_cuda_compile.py finds in the compiled kernels."""
    assert [kt for kt in range(-1, 13) if emulated.sta_emu_kt_supported(kt)] == [1, 3, 5, 7, 9]
    dtypes = list(DTYPE_CODE)
    one = {(a, c) for c in dtypes for a in dtypes if _dtypes_supported(emulated, c, a)}
    assert one == {(c, c) for c in dtypes} | {(torch.float32, torch.float16), (torch.float32, torch.bfloat16)}
    two = {(a, b, c) for c in dtypes for a in dtypes for b in dtypes if _dtypes_supported(emulated, c, a, b)}
    assert len(two) == 7 and (torch.float32, torch.float32, torch.float16) not in two
    assert (torch.float32, torch.float16, torch.float16) in two and (torch.bfloat16, torch.float32, torch.bfloat16) in two
    # a dtype the table lacks is refused by the launcher, not launched
    assert emulated.sta_emu_up_residual(None, 1, _i64s(0, 8, 8, 1), None, None, _i64s(8, 1), 2, None, None,
                                        1, 1, 8, 8, 0) == CUDA_ERROR_INVALID_VALUE
    # GEMM configs: 0 (default), 1, 2; others are refused
    assert [c for c in range(-1, 8) if emulated.sta_emu_gemm_config_supported(c)] == [0, 1, 2]
    assert emulated.sta_emu_up_residual(None, 1, _i64s(0, 8, 8, 1), None, None, _i64s(8, 1), 1, None, None,
                                        1, 1, 8, 8, 3) == CUDA_ERROR_INVALID_VALUE


def test_launch_refuses_grids_past_the_hardware_limit(emulated):
    """Grids are int64 block counts checked against gridDim.x <= 2**31 - 1 before the cast to
    unsigned: a launch that would wrap returns cudaErrorInvalidConfiguration and runs no block
    (the null pointers below are never touched). One block under the limit is not refused."""
    too_many_rows = 128 * (2 ** 31)  # up-residual: 128 rows per block, one 64-column tile
    rc = emulated.sta_emu_up_residual(None, 0, _i64s(0, 64, 64, 1), None, None, _i64s(64, 1), 0, None, None,
                                      too_many_rows, 1, 64, 64, 0)
    assert rc == CUDA_ERROR_INVALID_CONFIGURATION
    # down-conv: 2**31 * 64 clips of one frame and one spatial token, 64 flattened rows per block
    shape = _i64s(64 * 2 ** 31, 1, 1, 64, 64, 3, 1, 0)
    rc = emulated.sta_emu_down_conv(None, 0, _i64s(0, 64, 64, 1), None, _i64s(64, 1), 0, None, None, None, None, None,
                                    shape, 0)
    assert rc == CUDA_ERROR_INVALID_CONFIGURATION
    assert emulated.sta_emu_sum_partials(None, None, 1, 256 * (2 ** 31)) == CUDA_ERROR_INVALID_CONFIGURATION
    # a grid under the limit runs: sum_partials of one block (numel 256)
    part = torch.arange(512, dtype=torch.float32)
    out = torch.empty(256)
    assert emulated.sta_emu_sum_partials(_ptr(part), _ptr(out), 2, 256) == 0
    torch.testing.assert_close(out, part[:256] + part[256:])
