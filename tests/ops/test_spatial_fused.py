"""Spatial conv kernels (kt, kh, kw) on the Triton backend (kernels/adapter_stencil.py: the
down-projection, a depthwise 3-D stencil, the up-projection; backward with the transposed
stencil), forward and backward, under THE parity rule (st_adapter_fast.parity) against float64:
the output and every gradient, scale's included, with every §9 switch the Triton path fuses.
prefix_mode="mlp" (MMAction2's module: prefix rows through the stencils without a conv) too.
Also: a buffer layout with prefix rows (BUF_L, BUF_P) at the kernel level, dispatch runs them
fused (no fallback) saving only x, the parameters and the draw, kt > 9 / kh, kw > 7 refused by
name, the launch budget (3 forward, 7 backward).

Runs in the Triton interpreter on CPU (~50 s on 2 cores); ST_ADAPTER_FAST_FULL_GRID=1 adds
FULL_CASES (kernels (1, 3, 3), (3, 3, 3), (5, 3, 3), (3, 5, 7) x T in {1, 2, 8} x switches).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F

from st_adapter_fast import STAdapter, ops, parity
from st_adapter_fast.parity import Case
from st_adapter_fast.variants import Variant

from helpers import check_fused_switches, fused_device, triton_interpreter_on

FULL = os.environ.get("ST_ADAPTER_FAST_FULL_GRID", "0") == "1"
DEVICE = fused_device()
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreter_on(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

# MMAction2's switches (parity.MMACTION2, with DropPath 0.5 so the seeded draw drops some clips),
# and without its prefix_mode="mlp"
MMACTION2_FUSED = Variant(act_after_conv="relu", prefix_mode="mlp", scale=True, drop_path=0.5)
SKIP_RELU_SCALE_DP = Variant(act_after_conv="relu", scale=True, drop_path=0.5)
GELU_MMACTION2 = Variant(act_after_fc1="gelu", act_after_conv="relu", scale=True, drop_path=0.5)
LN_GELU_SCALE = Variant(norm="layernorm", act_after_fc1="gelu", scale=True)
LN_MMACTION2_GELU = Variant(norm="layernorm", act_after_conv="gelu", prefix_mode="mlp", scale=True, drop_path=0.5)


def _case(variant, kernel, *, batch=2, frames=2, grid=(3, 5), prefix=1, **kw):
    return Case(batch=batch, frames=frames, grid=grid, prefix=prefix, channels=20, adapter_channels=12,
                kernel=kernel, variant=variant, **kw)


# kernels (1, 3, 3), (3, 3, 3), (5, 3, 3) and non-square ones ((3, 5, 7) on a 4x3 grid: the
# kernel wider than the grid; (1, 1, 3)); T in {1, 2, 8}, P in {0, 1, 2}, non-square grids,
# strided x, no biases once; DropPath batches whose seeded draw drops some clips, keeps others
CASES = [
    _case(Variant(), (1, 3, 3), frames=1, prefix=0),
    _case(Variant(act_after_fc1="gelu"), (3, 3, 3), frames=2, prefix=1, grid=(4, 3)),
    _case(Variant(act_after_conv="quick_gelu"), (5, 3, 3), batch=1, frames=8, prefix=2, grid=(2, 3), bias=False),
    _case(SKIP_RELU_SCALE_DP, (3, 5, 7), batch=3, frames=2, prefix=1, grid=(4, 3), noncontiguous=True),
    _case(MMACTION2_FUSED, (3, 3, 3), batch=3, frames=2, prefix=1, grid=(3, 3)),
    _case(Variant(act_after_fc1="gelu", act_after_conv="quick_gelu", prefix_mode="mlp", scale=True, drop_path=0.5),
          (1, 3, 3), batch=2, frames=2, prefix=2, grid=(4, 3), noncontiguous=True),
    _case(GELU_MMACTION2, (3, 3, 3), batch=4, frames=2, prefix=0, grid=(3, 5)),
    _case(Variant(act_after_fc1="quick_gelu", scale=True), (1, 1, 3), batch=1, frames=8, prefix=2, grid=(3, 2)),
    # with the LayerNorm before fc1 (kernels/adapter_prenorm.py): AIM-style pre-norm + GELU, and
    # MMAction2's module with a pre-norm (GELU after the conv: its ReLU + norm runs fp32 below)
    _case(LN_GELU_SCALE, (3, 3, 3), batch=2, frames=2, prefix=2, grid=(3, 4)),
    _case(LN_MMACTION2_GELU, (3, 3, 3), batch=4, frames=8, prefix=1, grid=(2, 3)),
]
FULL_CASES = [
    _case(v, k, batch=4, frames=t, prefix=i % 3, grid=((3, 5), (4, 3), (2, 7))[i % 3], noncontiguous=i % 2 == 1)
    for i, (v, k, t) in enumerate(
        (v, k, t)
        for v in (Variant(), Variant(act_after_fc1="gelu"), Variant(act_after_conv="gelu"), MMACTION2_FUSED,
                  SKIP_RELU_SCALE_DP, GELU_MMACTION2)
        for k in ((1, 3, 3), (3, 3, 3), (5, 3, 3), (3, 5, 7)) for t in (1, 2, 8))
] if FULL else []
MODES = ["fp32", "bf16"]




def _check(case, mode_name, seed=5):
    inputs = parity.condition_inputs(case, parity.make_inputs(case, seed=seed), sixteen_bit=mode_name != "fp32",
                                     device=DEVICE)
    got = check_fused_switches(case, inputs, mode_name, DEVICE)
    assert got["conv_weight"].shape == (case.adapter_channels, 1, *case.kernel)


@pytest.mark.parametrize("mode_name", MODES)
@pytest.mark.parametrize("case", CASES + FULL_CASES, ids=[c.label() for c in CASES + FULL_CASES])
def test_spatial_parity(case, mode_name):
    _check(case, mode_name)


@pytest.mark.parametrize("mode_name", MODES)
def test_every_switch_at_once(mode_name):
    """MMAction2's module (kernel (3, 3, 3), ReLU after the conv, prefix MLP, scale, DropPath)
    with a LayerNorm before fc1 and GELU after it: every docs/design.md §9 switch in one call."""
    v = Variant(norm="layernorm", act_after_fc1="gelu", act_after_conv="relu", prefix_mode="mlp", scale=True,
                drop_path=0.5)
    _check(_case(v, (3, 3, 3), batch=4, frames=2, prefix=2, grid=(3, 3), noncontiguous=True), mode_name)


def test_cases_cover_the_brief():
    kernels = {c.kernel for c in CASES}
    assert kernels >= {(1, 3, 3), (3, 3, 3), (5, 3, 3), (3, 5, 7), (1, 1, 3)}
    assert {c.frames for c in CASES} == {1, 2, 8} and {c.prefix for c in CASES} == {0, 1, 2}
    assert any(c.grid[0] != c.grid[1] for c in CASES) and any(c.noncontiguous for c in CASES)
    variants = {c.variant for c in CASES}
    assert {MMACTION2_FUSED, SKIP_RELU_SCALE_DP, GELU_MMACTION2} <= variants
    assert {c.prefix for c in CASES if c.variant.prefix_mode == "mlp"} == {1, 2}


def _stencil_operands(layout_rows, prefix, frames=2, clips=2, grid=(3, 4), ca=20, kernel=(3, 3, 3), seed=0):
    """(a, dg, h, taps, bc) as (clips*frames*layout_rows, Ca) buffers with spatial rows from
    `prefix`, their other rows NaN (any read of them would poison a result)."""
    gen = torch.Generator().manual_seed(seed)
    s = grid[0] * grid[1]
    n_frames = clips * frames

    def buf():
        t = torch.full((n_frames, layout_rows, ca), float("nan"))
        t[:, prefix:prefix + s] = torch.randn(n_frames, s, ca, generator=gen)
        return t.reshape(n_frames * layout_rows, ca)

    a, dg, h = buf(), buf(), buf()
    taps = torch.randn(ca, *kernel, generator=gen)
    return a, dg, h, taps, torch.randn(ca, generator=gen)


def test_stencil_buffer_layout_with_prefix_rows():
    """BUF_L, BUF_P: buffers holding every row of a frame (L = P + S, spatial rows from P), as
    prefix_mode="mlp" will lay them out, give the flat layout's results on the spatial rows,
    bitwise, and never read the prefix rows (NaN there); with act1 the h operand too. A ragged
    block of channels (Ca = 20) and rows (2*2*12 = 48 tokens over 64-row tiles)."""
    from st_adapter_fast.kernels import adapter_stencil
    from st_adapter_fast.kernels._common import act_code

    grid, frames, prefix, seq = (3, 4), 2, 2, 2 + 12
    a, dg, h, taps, bc = _stencil_operands(seq, prefix, frames=frames, grid=grid)

    def spatial(t):
        return t.reshape(-1, seq, t.shape[-1])[:, prefix:].reshape(-1, t.shape[-1]).contiguous()

    draw = torch.tensor([1.0, 0.0])
    kw = dict(act2=act_code("gelu"), g_drop=(draw, 0.5))
    pre_wide, pre_flat = torch.zeros_like(a), torch.zeros_like(spatial(a))
    g_wide = adapter_stencil.stencil_forward(a, frames, grid, taps, bc, g_pre=pre_wide, buf_l=seq, buf_p=prefix, **kw)
    g_flat = adapter_stencil.stencil_forward(spatial(a), frames, grid, taps, bc, g_pre=pre_flat, **kw)
    assert torch.isfinite(g_flat).all() and g_flat.abs().sum() > 0
    assert torch.equal(spatial(g_wide), g_flat) and torch.equal(spatial(pre_wide), pre_flat)
    # the dropped clip's g is 0, its g_pre is not
    assert (g_flat[24:] == 0).all() and (pre_flat[24:] != 0).any()
    act1 = act_code("quick_gelu")
    dh_wide, part_wide = adapter_stencil.stencil_backward(dg, a, h, frames, grid, taps, act1=act1, buf_l=seq,
                                                          buf_p=prefix)
    dh_flat, part_flat = adapter_stencil.stencil_backward(spatial(dg), spatial(a), spatial(h), frames, grid, taps,
                                                          act1=act1)
    assert torch.isfinite(dh_flat).all() and torch.isfinite(part_flat).all()
    assert torch.equal(spatial(dh_wide), dh_flat) and torch.equal(part_wide, part_flat)


def test_stencil_prefix_rows_pass_through():
    """prefix=True (prefix_mode="mlp"): the buf_p rows before each frame's spatial ones get
    g = act2(a) * m[clip] and g_pre = a forward, dh = dg * act1'(h) backward -- no conv, no conv
    bias, no dwc share; the spatial rows as without them. 2 clips x 2 frames x 3 prefix rows:
    one 64-row prefix block, ragged."""
    from st_adapter_fast.kernels import adapter_stencil
    from st_adapter_fast.kernels._common import act_code

    grid, frames, prefix, seq = (3, 4), 2, 3, 3 + 12
    a, dg, h, taps, bc = _stencil_operands(seq, prefix, frames=frames, grid=grid)
    gen = torch.Generator().manual_seed(1)
    rows = torch.arange(a.shape[0]).reshape(-1, seq)[:, :prefix].flatten()
    for t in (a, dg, h):
        t[rows] = torch.randn(len(rows), t.shape[1], generator=gen)
    draw = torch.tensor([1.0, 0.0])
    layout = dict(buf_l=seq, buf_p=prefix)
    pre = torch.zeros_like(a)
    g = adapter_stencil.stencil_forward(a, frames, grid, taps, bc, act2=act_code("gelu"), g_pre=pre,
                                        g_drop=(draw, 0.5), prefix=True, **layout)
    g_skip = adapter_stencil.stencil_forward(a, frames, grid, taps, bc, act2=act_code("gelu"), g_drop=(draw, 0.5),
                                             **layout)
    factor = (draw / 0.5).repeat_interleave(frames * prefix)[:, None]
    torch.testing.assert_close(g[rows], F.gelu(a[rows]) * factor, rtol=1e-6, atol=1e-6)
    assert torch.equal(pre[rows], a[rows]) and (g[rows[len(rows) // 2:]] == 0).all()
    spatial = torch.ones(a.shape[0], dtype=torch.bool)
    spatial[rows] = False
    assert torch.equal(g[spatial], g_skip[spatial])
    act1 = act_code("quick_gelu")
    dh, part = adapter_stencil.stencil_backward(dg, a, h, frames, grid, taps, act1=act1, prefix=True, **layout)
    dh_skip, part_skip = adapter_stencil.stencil_backward(dg, a, h, frames, grid, taps, act1=act1, **layout)
    quick_grad = torch.func.grad(lambda t: (t * torch.sigmoid(1.702 * t)).sum())(h[rows])
    torch.testing.assert_close(dh[rows], dg[rows] * quick_grad, rtol=1e-6, atol=1e-6)
    assert torch.equal(dh[spatial], dh_skip[spatial]) and torch.equal(part, part_skip)


def test_stencil_against_conv3d():
    """The two stencils alone against torch's conv3d and its autograd in float64 (fp32 kernels):
    g = conv3d(a) + bc, dh = conv3d^T(dg) * act1'(h), dwc = sum of the partials; a (3, 3, 5)
    kernel on a 4x3 grid reaches past every frame edge."""
    from st_adapter_fast.kernels import adapter_stencil
    from st_adapter_fast.kernels._common import act_code

    grid, frames, clips, kernel = (4, 3), 3, 2, (3, 3, 5)
    a, dg, h, taps, bc = _stencil_operands(12, 0, frames=frames, clips=clips, grid=grid, kernel=kernel)
    ca = taps.shape[0]

    def grid5(t):  # (clips*frames*S, Ca) -> (clips, Ca, T, H, W)
        return t.double().reshape(clips, frames, *grid, ca).permute(0, 4, 1, 2, 3)

    a64 = grid5(a).requires_grad_()
    w64 = taps.double()[:, None].requires_grad_()
    g64 = F.conv3d(a64, w64, bc.double(), padding=tuple(k // 2 for k in kernel), groups=ca)
    g64.backward(grid5(dg))
    g = adapter_stencil.stencil_forward(a, frames, grid, taps, bc)
    torch.testing.assert_close(grid5(g), g64.detach(), rtol=1e-5, atol=1e-5)
    dh, part = adapter_stencil.stencil_backward(dg, a, h, frames, grid, taps, act1=act_code("gelu"))
    gelu_grad = torch.func.grad(lambda t: F.gelu(t).sum())(h.double())
    torch.testing.assert_close(dh.double(), a64.grad.permute(0, 2, 3, 4, 1).reshape(-1, ca) * gelu_grad,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(part.double().sum(0).t().reshape(ca, *kernel), w64.grad[:, 0], rtol=1e-5, atol=1e-5)


def test_runs_fused_without_fallback_and_saves_only_inputs(monkeypatch):
    """"auto" runs a (3, 3, 3) kernel with the fused switches (MMAction2's prefix MLP among them)
    on Triton -- no fallback warning, the explicit backend's result bitwise -- and only x, the
    parameters (scale included) and the (B,) DropPath draw are saved for backward."""
    monkeypatch.setattr(ops, "AUTO_FUSED_DEVICES", ("cuda", DEVICE))
    monkeypatch.setattr(ops, "_WARNED", set())
    m = STAdapter(16, 8, (3, 3, 3), grid_size=(3, 4), act_after_fc1="gelu", act_after_conv="relu", scale=0.5,
                  drop_path=0.3, prefix_mode="mlp").to(DEVICE).train()
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(4 * 2, 1 + 12, 16, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        assert ops.resolve_backend("auto", x, (3, 3, 3), torch.float32, m.variant) == "triton"
        torch.manual_seed(3)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = m(x, 2)
    m.backend = "triton"
    torch.manual_seed(3)
    assert torch.equal(out, m(x, 2))
    params = sum(q.numel() * q.element_size() for q in m.parameters())
    extra = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() != x.data_ptr())
    assert extra == params + 4 * 4, (extra, params)  # + the float32 draw of 4 clips
    out.square().sum().backward()
    assert all(q.grad is not None and q.grad.abs().sum() > 0 for q in m.parameters())
    assert m.conv.weight.grad.shape == (8, 1, 3, 3, 3)


@pytest.mark.parametrize("kernel,named", [
    ((11, 3, 3), r"kernel_size \(11, 3, 3\): temporal kernels up to 9"),
    ((3, 9, 3), r"kernel_size \(3, 9, 3\): spatial kernels up to kh, kw = 7"),
    ((1, 3, 9), r"kernel_size \(1, 3, 9\): spatial kernels up to kh, kw = 7"),
], ids=["kt11", "kh9", "kw9"])
def test_triton_refuses_beyond_the_fused_extents_by_name(kernel, named):
    m = STAdapter(8, 4, kernel, backend="triton", act_after_conv="relu").to(DEVICE)
    with pytest.raises(RuntimeError, match=f"backend='triton' cannot run this call: {named}"):
        m(torch.randn(4, 1 + 16, 8, device=DEVICE), 2)


@pytest.mark.parametrize("prefix_mlp", [False, True], ids=["skip", "mlp"])
def test_launch_budget_of_the_spatial_path(prefix_mlp):
    """Forward: down-projection, stencil, up-projection (+ DropPath's bernoulli_); backward:
    seven launches (recompute down-projection + stencil, dg, transposed stencil, dgrad, wgrad,
    finalize), eight with prefix_mode="mlp" (the prefix rows' dg launch), no torch op between --
    counted as the work model counts (meta tensors)."""
    from st_adapter_fast.kernels import adapter_bwd, adapter_fwd, aot, work_model

    b, t, seq, c, ca = 2, 8, 197, 768, 384  # shape A's per-clip sizes, two clips
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(b * t, seq, c, **meta)
    params = [torch.empty(ca, c, **meta), torch.empty(ca, **meta), torch.empty(ca, 3, 3, 3, **meta),
              torch.empty(ca, **meta), torch.empty(c, ca, **meta), torch.empty(c, **meta)]
    counts = {}
    saved_draw = ops.drop_path_draw(b, 0.1, "meta")
    for pass_name in ("fwd", "bwd"):
        events, sink = [], []
        with aot._recording(90, sink, events), work_model._OpCapture(events):
            draw = ops.drop_path_draw(b, 0.1, "meta") if pass_name == "fwd" else saved_draw
            switches = dict(act_after_fc1="gelu", act_after_conv="relu", scale=torch.empty((), **meta),
                            drop_draw=draw, drop_path=0.1, grid_size=(14, 14), prefix_mlp=prefix_mlp)
            if pass_name == "fwd":
                adapter_fwd.adapter_forward(x, t, 1, *params, **switches)
            else:
                grads = adapter_bwd.adapter_backward(x, x, t, 1, *params, **switches)
                assert len(grads) == 8 and grads[3].shape == (ca, 3, 3, 3)
        counts[pass_name] = [getattr(e, "name", None) or e.variant.kernel for e in events]
    assert counts["fwd"] == ["aten.bernoulli_", "adapter_down_conv_fwd_kernel", "adapter_stencil_fwd_kernel",
                             "adapter_up_residual_fwd_kernel"], counts["fwd"]
    dg = ["adapter_conv_bwd_kernel"] * (2 if prefix_mlp else 1)
    assert counts["bwd"] == ["adapter_down_conv_fwd_kernel", "adapter_stencil_fwd_kernel", *dg,
                             "adapter_stencil_bwd_kernel", "adapter_up_residual_fwd_kernel", "adapter_wgrad_kernel",
                             "adapter_grad_finalize_kernel"], counts["bwd"]


def test_work_model_of_the_spatial_path():
    """kernels/work_model.py on shape A (B8 T8 L197 C768 Ca384, bf16, sm_90), variant "k333"
    (MMAction2's: (3, 3, 3), ReLU after the conv, prefix MLP, scale, DropPath) against "mlp"
    (the same switches' GEMMs with (3, 1, 1)): the same GEMM work (the conv moves out of the
    window kernels into the stencils, which issue no MMA), 3 + 8 launches, and the stencils'
    bytes: a read and g written once forward (the recompute also writes g before the ReLU);
    backward dg and a read, dh written, plus the fp32 dwc partials of 98 row blocks x 27 taps x
    384 channels (4 MB); the 64 prefix rows pass through without the taps."""
    from st_adapter_fast.kernels import work_model

    rows = work_model.model_rows({"A": (8, 8, 197, 768, 384)}, torch.bfloat16, 90, compile_kernels=False,
                                 variants=("mlp", "k333"))
    summary = work_model.summary(rows)
    spatial, temporal = summary["A+k333"], summary["A+mlp"]
    assert (spatial["launches_fwd"], spatial["launches_bwd"]) == (3, 8)
    assert spatial["flops_required"] == temporal["flops_required"]
    assert spatial["flops_executed"] < temporal["flops_executed"]  # KT = 0 windows: no halo frames
    n_tok, n_pre, ca, taps = 8 * 8 * 196, 8 * 8, 384, 27
    stencils = [(r.pass_, r.kernel, r.hbm_bytes_min) for r in rows if r.shape == "A+k333" and "stencil" in r.kernel]
    assert stencils == [
        ("fwd", "adapter_stencil_fwd_kernel", (n_tok + n_pre) * ca * 2 * 2 + ca * taps * 2),
        ("bwd", "adapter_stencil_fwd_kernel", (n_tok + n_pre) * ca * 2 * 3 + ca * taps * 2),
        ("bwd", "adapter_stencil_bwd_kernel", n_tok * ca * 2 * 3 + n_pre * ca * 2 * 2 + 98 * taps * ca * 4),
    ], stencils
    assert all(r.flops_executed == 0 for r in rows if "stencil" in r.kernel)


def test_multi_tile_spatial():
    """Several row and channel blocks in both stencils (140 tokens: 3 forward / 2 backward row
    blocks, whose neighbours sit in other blocks; Ca = 40: 2 / 3 channel blocks, the last
    ragged; frame runs and wgrad splits: tests/ops/test_variants_fused.py), every fused switch."""
    # (1, 3, 3): a third of (3, 3, 3)'s interpreter time; grid rows still straddle row blocks
    case = Case(batch=2, frames=2, grid=(5, 7), prefix=1, channels=24, adapter_channels=40, kernel=(1, 3, 3),
                variant=GELU_MMACTION2)
    _check(case, "fp32")
