"""norm="layernorm" (a LayerNorm over C before fc1, docs/design.md §9) fused in the Triton
backend (kernels/adapter_prenorm.py): forward and backward under THE parity rule against float64
-- the output and every gradient, the LayerNorm's affine included -- alone, with GELU after fc1
(the AIM / Side4Video style), with every switch the kernels fuse, without affine tensors; kt in
{1, 3, 5}, T in {1, 2, 8}, P in {0, 1, 2}, strided x, rows of mean 50 (the statistics' numerical
safety), with prefix_mode="mlp" (prefix rows normalised too). Also: the row statistics of the recompute against float64, dispatch without fallback,
the launch budget, and that only x and the parameters are saved.

Runs in the Triton interpreter on CPU; ST_ADAPTER_FAST_FULL_GRID=1 adds FULL_CASES.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from st_adapter_fast import STAdapter, ops, parity
from st_adapter_fast.parity import Case
from st_adapter_fast.variants import Variant

from helpers import check_fused_switches, fused_device, triton_interpreter_on

FULL = os.environ.get("ST_ADAPTER_FAST_FULL_GRID", "0") == "1"
DEVICE = fused_device()
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreter_on(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

NORM = Variant(norm="layernorm")
AIM = Variant(norm="layernorm", act_after_fc1="gelu")
# every switch the kernels fuse; smooth activations, so 16-bit runs cannot flip a ReLU gate
# (the ReLU epilogues are the same code with NORM: EVERY_RELU covers them in fp32)
EVERY = Variant(norm="layernorm", act_after_fc1="gelu", act_after_conv="quick_gelu", scale=True, drop_path=0.5)
EVERY_RELU = Variant(norm="layernorm", act_after_fc1="relu", act_after_conv="relu", scale=True, drop_path=0.5)
NORM_MLP = Variant(norm="layernorm", prefix_mode="mlp")
EVERY_MLP = Variant(norm="layernorm", act_after_fc1="quick_gelu", act_after_conv="gelu", prefix_mode="mlp", scale=True,
                    drop_path=0.5)
MODES = ["fp32", "bf16", "autocast-bf16"]


def _case(variant, *, batch=2, frames=2, grid=(2, 3), prefix=1, kt=3, channels=40, **kw):
    # C = 40: two K blocks of the down-projection (the second partial) and two C blocks in both
    # walks of the dgrad kernel (its unaligned 32-wide tiles)
    return Case(batch=batch, frames=frames, grid=grid, prefix=prefix, channels=channels, adapter_channels=12,
                kernel=(kt, 1, 1), variant=variant, **kw)


# (case, affine: "both" | "none" | "weight" | "bias", row mean added to x, modes): every case in
# some mode, the main ones in all three (the interpreter's ~2-4 s per check keeps CI near a minute)
ALL, FP32 = tuple(MODES), ("fp32",)
CASES = [
    (_case(NORM, frames=2, prefix=1, kt=3), "both", 0.0, ALL),
    (_case(AIM, batch=1, frames=8, prefix=0, kt=3, grid=(2, 2)), "both", 0.0, ALL),
    (_case(EVERY, batch=4, frames=2, prefix=2, kt=3, noncontiguous=True), "both", 0.0, ALL),
    (_case(NORM, frames=2, prefix=2, kt=3, noncontiguous=True), "bias", 50.0, ALL),
    (_case(NORM, frames=1, prefix=0, kt=1, grid=(3, 3), bias=False), "none", 0.0, ("bf16",)),
    (_case(AIM, batch=1, frames=8, prefix=1, kt=5), "weight", 0.0, ("autocast-bf16",)),
    (_case(EVERY_RELU, batch=4, frames=2, prefix=1, kt=3), "both", 0.0, FP32),
    (_case(NORM, batch=2, frames=8, prefix=1, kt=5, channels=72), "both", 50.0, FP32),
    # prefix_mode="mlp": the prefix rows normalised too (their own KT = 0 launch, one fold)
    (_case(NORM_MLP, batch=2, frames=2, prefix=2, kt=3), "both", 0.0, ("fp32", "autocast-bf16")),
    (_case(EVERY_MLP, batch=4, frames=2, prefix=1, kt=3, noncontiguous=True), "weight", 0.0, ("bf16",)),
]
FULL_CASES = [
    (_case(v, batch=4, frames=t, prefix=i % 3, kt=kt, noncontiguous=i % 2 == 1), ("both", "none")[i % 5 == 4],
     50.0 if i % 7 == 3 else 0.0, ALL)
    for i, (v, kt, t) in enumerate((v, kt, t) for v in (NORM, AIM, EVERY) for kt in (1, 3, 5) for t in (1, 2, 8))
] if FULL else []
PARAMS = [(c, a, m, mode) for c, a, m, modes in CASES + FULL_CASES for mode in modes]




def _inputs(case, affine, mean, seed=5):
    inputs = parity.make_inputs(case, seed=seed)
    assert inputs["norm_weight"] is not None and inputs["norm_bias"] is not None
    if affine in ("none", "bias"):
        inputs["norm_weight"] = None
    if affine in ("none", "weight"):
        inputs["norm_bias"] = None
    if mean:
        # std 1 around the mean, rounded to bf16 values (exact in every mode): at mean 50 a bf16
        # x is 0.25 apart, so an unrounded float64 x would put the error of the INPUT's rounding
        # (~5% here, eager's too) above the backstop and measure nothing of the statistics
        inputs["x"] = (inputs["x"] + mean).to(torch.bfloat16).double()
    return parity.uncancel_scale_grad(case, inputs, DEVICE)


def _check(case, affine, mean, mode_name):
    inputs = _inputs(case, affine, mean)
    got = check_fused_switches(case, inputs, mode_name, DEVICE, case.label() + f"-{affine}-mean{mean}")
    assert ("norm_weight" in got) == (affine in ("both", "weight"))
    assert ("norm_bias" in got) == (affine in ("both", "bias"))


@pytest.mark.parametrize("case,affine,mean,mode_name", PARAMS,
                         ids=[f"{c.label()}-{a}{f'-mean{m:g}' if m else ''}-{mode}" for c, a, m, mode in PARAMS])
def test_prenorm_parity(case, affine, mean, mode_name):
    _check(case, affine, mean, mode_name)


def test_cases_cover_the_grid():
    cases = [c for c, _, _, _ in CASES]
    assert {c.prefix for c in cases} == {0, 1, 2} and {c.frames for c in cases} == {1, 2, 8}
    assert {c.kernel[0] for c in cases} == {1, 3, 5}
    assert {a for _, a, _, _ in CASES} == {"both", "none", "weight", "bias"}
    assert any(m for _, _, m, _ in CASES) and any(c.noncontiguous for c in cases) and any(not c.bias for c in cases)
    assert {NORM, AIM, EVERY, EVERY_RELU, NORM_MLP, EVERY_MLP} <= {c.variant for c in cases}
    for v in (NORM, AIM, EVERY):  # the main variants in every mode, the large-mean rows too
        assert any(c.variant == v and modes == ALL for c, _, _, modes in CASES)
    assert any(m and modes == ALL for _, _, m, modes in CASES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recompute_row_statistics_of_large_mean_rows(dtype):
    """The recompute's per-row mean and rstd against float64 on rows of mean 50 and 1000, std 1
    (and one outlier channel of 300 at the start of a row): the shifted sums keep fp32's precision
    where a raw E[x^2] - E[x]^2 in fp32 loses it (at mean 1000: var ~ 1 out of 1e6, ~6e-2 of
    cancellation error per unit of variance)."""
    from st_adapter_fast.kernels import adapter_fwd

    gen = torch.Generator().manual_seed(0)
    b, t, s, c, ca, p = 2, 2, 5, 72, 16, 1
    x64 = torch.randn(b * t, p + s, c, generator=gen, dtype=torch.float64)
    x64[:, :, :] += torch.tensor([50.0, 1000.0, -50.0, 0.0], dtype=torch.float64)[:, None, None]
    x64[0, 1, 0] = 300.0  # an outlier in the first K block
    x = x64.to(dtype)
    xs = x.double()[:, p:].reshape(-1, c)
    want_mean = xs.mean(1)
    want_rstd = (xs.var(1, unbiased=False) + 1e-5).rsqrt()
    wd = torch.randn(ca, c, generator=gen).to(dtype) * 0.1
    taps = torch.randn(ca, 3, generator=gen).to(dtype)
    lnw, lnb = torch.rand(c, generator=gen).to(dtype) + 0.5, torch.randn(c, generator=gen).to(dtype)
    stats = torch.full((2, b * t * s), float("nan"))
    adapter_fwd.down_conv_forward(x, t, p, wd, None, taps, None, store_h=True, norm=(lnw, lnb, 1e-5),
                                  norm_stats=(stats[0], stats[1]))
    assert torch.isfinite(stats).all()
    mean_err = ((stats[0].double() - want_mean).abs() / want_mean.abs().clamp_min(1)).max().item()
    rstd_err = ((stats[1].double() - want_rstd).abs() / want_rstd).max().item()
    # fp32 rounding of the inputs' sums (72 terms of ~1e3: ~1e-5 relative per unit variance)
    assert mean_err < 1e-6 and rstd_err < 2e-5, (mean_err, rstd_err)


def test_runs_fused_without_fallback(monkeypatch):
    """With x's device offered to the fused backends (as CUDA tensors are), "auto" runs norm
    (with GELU after fc1) on Triton, no fallback warning, the explicit backend's result bitwise."""
    monkeypatch.setattr(ops, "AUTO_FUSED_DEVICES", ("cuda", DEVICE))
    monkeypatch.setattr(ops, "_WARNED", set())
    m = STAdapter(16, 8, (3, 1, 1), norm="layernorm", act_after_fc1="gelu").to(DEVICE)
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(4 * 2, 10, 16, device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        assert ops.resolve_backend("auto", x, (3, 1, 1), torch.float32, m.variant) == "triton"
        out = m(x, 2)
    m.backend = "triton"
    assert torch.equal(out, m(x, 2))


def test_launch_budget_with_norm():
    """Forward: the parameter fold, then the two kernels; backward: the fold, the recompute, the
    conv backward, the LN dgrad, the wgrad, the finalize -- no torch op between (counted as the
    work model counts: kernels recorded on meta tensors, every launching torch op)."""
    from st_adapter_fast.kernels import adapter_bwd, adapter_fwd, aot, work_model

    b, t, seq, c, ca = 2, 8, 197, 768, 384
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(b * t, seq, c, **meta)
    params = [torch.empty(ca, c, **meta), torch.empty(ca, **meta), torch.empty(ca, 3, **meta),
              torch.empty(ca, **meta), torch.empty(c, ca, **meta), torch.empty(c, **meta)]
    norm = (torch.empty(c, **meta), torch.empty(c, **meta), 1e-5)
    counts = {}
    for pass_name in ("fwd", "bwd"):
        events, sink = [], []
        with aot._recording(90, sink, events), work_model._OpCapture(events):
            switches = dict(act_after_fc1="gelu", scale=torch.empty((), **meta), norm=norm)
            if pass_name == "fwd":
                adapter_fwd.adapter_forward(x, t, 1, *params, **switches)
            else:
                grads = adapter_bwd.adapter_backward(x, x, t, 1, *params, **switches)
                assert len(grads) == 10 and grads[7].shape == () and grads[8].shape == grads[9].shape == (c,)
        counts[pass_name] = [getattr(e, "name", None) or e.variant.kernel for e in events]
    assert counts["fwd"] == ["adapter_norm_fold_kernel", "adapter_down_conv_fwd_kernel",
                             "adapter_up_residual_fwd_kernel"], counts["fwd"]
    assert counts["bwd"] == ["adapter_norm_fold_kernel", "adapter_down_conv_fwd_kernel", "adapter_conv_bwd_kernel",
                             "adapter_prenorm_dgrad_kernel", "adapter_wgrad_kernel",
                             "adapter_grad_finalize_kernel"], counts["bwd"]


def test_work_model_of_the_norm_path():
    """Shape A (B8 T8 L197 C768 Ca384, bf16, sm_90): norm adds no GEMM FLOPs (the LayerNorm rides
    in the K loop and the dgrad's walks), one fold launch per pass, and in backward x's second
    read and z's write (2 N C bytes, N = B*T*S) beyond the plain adapter's traffic; the forward
    moves only the fold's ~2 Ca C bytes more."""
    from st_adapter_fast.kernels import work_model

    b, t, seq, c, ca = 8, 8, 197, 768, 384
    n_tok = b * t * (seq - 1)
    rows = work_model.model_rows({"A": (b, t, seq, c, ca)}, torch.bfloat16, 90, 3, compile_kernels=False,
                               variants=("norm",))
    total = {(r.shape, r.pass_): [0, 0, 0] for r in rows}
    for r in rows:
        acc = total[(r.shape, r.pass_)]
        acc[0] += 1
        acc[1] += r.flops_required
        acc[2] += r.hbm_bytes_min
    for p, extra_launches in (("fwd", 1), ("bwd", 1)):
        plain, norm = total[("A", p)], total[("A+norm", p)]
        assert norm[0] == plain[0] + extra_launches and norm[1] == plain[1], (p, plain, norm)
    fold = 2 * ca * c * 2 + 4 * (c + ca) * 2
    assert total[("A+norm", "fwd")][2] - total[("A", "fwd")][2] <= fold
    extra_bwd = total[("A+norm", "bwd")][2] - total[("A", "bwd")][2]
    # + the stats (8 B per token), the affine partials and their finalize, the fold
    assert 2 * n_tok * c * 2 <= extra_bwd <= 2 * n_tok * c * 2 + 8 * n_tok + 8 * 1024 * c + fold, extra_bwd


def test_work_model_flops_match_the_mma_tiles_issued(monkeypatch):
    """tests/kernels/test_work_model_counts.py for the norm path: counting 2*m*n*k in every
    _mma the interpreter runs over a forward and a backward gives the model's flops_executed
    (the LayerNorm K loop of the down-conv and the LN dgrad's walk-1 GEMM included)."""
    import contextlib

    from st_adapter_fast.kernels import _common, adapter_bwd, adapter_fwd, adapter_prenorm, tuning, wgrad, work_model
    from st_adapter_fast.kernels._common import TileConfig

    issued = []
    original = _common._mma

    def counting_mma(a, b, acc, dot_fp32, precision):
        issued.append(2 * int(a.shape[0]) * int(a.shape[1]) * int(b.shape[1]))
        return original(a, b, acc, dot_fp32, precision)

    for mod in (_common, wgrad, adapter_prenorm):
        monkeypatch.setattr(mod, "_mma", counting_mma)
    for mod in (adapter_fwd, wgrad):
        monkeypatch.setattr(mod, "sm_count", lambda t: 6)
    shape = (1, 4, 10, 40, 24)  # C = 40: three K blocks, the last partial; 9 rows per frame
    small = TileConfig(16, 16, 16, num_warps=4, num_stages=1, runs=2, splits=2)
    b, t, seq, c, ca = shape
    with contextlib.ExitStack() as stack:
        for fam in ("down_conv", "up_residual_unaligned", "conv_bwd_unaligned", "wgrad_unaligned",
                    "prenorm_dgrad_unaligned"):
            stack.enter_context(tuning.forced_config(fam, small))
        rows = work_model.model_rows({"s": shape}, torch.float32, 90, 3, compile_kernels=False, sms=6,
                                     variants=("norm",))
        rows = [r for r in rows if r.shape == "s+norm"]
        g = torch.Generator().manual_seed(0)
        x = torch.randn(b * t, seq, c, generator=g)
        params = [torch.randn(ca, c, generator=g), torch.randn(ca, generator=g), torch.randn(ca, 3, generator=g),
                  torch.randn(ca, generator=g), torch.randn(c, ca, generator=g), torch.randn(c, generator=g)]
        norm = (torch.randn(c, generator=g), torch.randn(c, generator=g), 1e-5)
        adapter_fwd.adapter_forward(x, t, 1, *params, norm=norm)
        fwd_issued = sum(issued)
        adapter_bwd.adapter_backward(torch.randn(x.shape, generator=g), x, t, 1, *params, norm=norm)
    assert fwd_issued == sum(r.flops_executed for r in rows if r.pass_ == "fwd")
    assert sum(issued) - fwd_issued == sum(r.flops_executed for r in rows if r.pass_ == "bwd")
    assert any(r.kernel == "adapter_prenorm_dgrad_kernel" for r in rows)
