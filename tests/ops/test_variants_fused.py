"""The docs/design.md §9 switches the Triton backend fuses -- act_after_fc1, act_after_conv,
scale and DropPath, for temporal kernels (kt, 1, 1) -- forward and backward, under THE parity
rule (st_adapter_fast.parity) against float64: the output and every gradient, scale's included.
Also: DropPath draws the reference's mask, nothing but x, the parameters and the per-clip draw is
saved, dispatch runs these fused (no fallback) and still refuses the rest by name, opcheck,
torch.compile fullgraph, meta tensors.

Runs in the Triton interpreter on CPU (~40 s on 2 cores); ST_ADAPTER_FAST_FULL_GRID=1 adds
FULL_CASES (every fused switch x kt in {1, 3, 5} x T in {1, 2, 8}).
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch

from st_adapter_fast import STAdapter, ops, parity, st_adapter
from st_adapter_fast.reference import drop_path_mask
from st_adapter_fast.parity import Case
from st_adapter_fast.variants import Variant

from helpers import check_fused_switches, fused_device, triton_interpreter_on

FULL = os.environ.get("ST_ADAPTER_FAST_FULL_GRID", "0") == "1"
DEVICE = fused_device()
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not triton_interpreter_on(),
                                reason="needs CUDA or TRITON_INTERPRET=1")

COMBINED = Variant(act_after_fc1="gelu", act_after_conv="relu", scale=True, drop_path=0.5)
# MMAction2's switches but its (3, 3, 3) kernel: ReLU after the conv, prefix MLP, scale, DropPath
MLP_COMBINED = Variant(act_after_conv="relu", prefix_mode="mlp", scale=True, drop_path=0.5)


def _case(variant, *, batch=2, frames=2, grid=(2, 3), prefix=1, kt=3, **kw):
    return Case(batch=batch, frames=frames, grid=grid, prefix=prefix, channels=20, adapter_channels=12,
                kernel=(kt, 1, 1), variant=variant, **kw)


# each switch alone, then combined; P in {0, 1, 2}, T in {1, 2, 8}, kt in {1, 3} (one 5), strided
# x, no biases (ReLU cases keep theirs: parity.clear_relu_gates); DropPath cases have batches whose
# seeded draw (parity.DROP_PATH_SEED) drops some clips and keeps others (asserted in _check)
CASES = [
    _case(Variant(act_after_fc1="gelu"), frames=2, prefix=1, kt=3),
    _case(Variant(act_after_fc1="quick_gelu"), frames=1, prefix=0, kt=1, grid=(3, 3)),
    _case(Variant(act_after_fc1="relu"), batch=1, frames=8, prefix=2, kt=3, grid=(2, 2)),
    _case(Variant(act_after_conv="gelu"), batch=1, frames=8, prefix=1, kt=3, noncontiguous=True),
    _case(Variant(act_after_conv="quick_gelu"), frames=2, prefix=2, kt=1, bias=False),
    _case(Variant(act_after_conv="relu"), frames=1, prefix=0, kt=3),
    _case(Variant(scale=True), frames=2, prefix=1, kt=3),
    _case(Variant(scale=True), batch=1, frames=8, prefix=0, kt=1, bias=False),
    _case(Variant(drop_path=0.5), batch=4, frames=2, prefix=2, kt=3),
    _case(COMBINED, batch=3, frames=2, prefix=1, kt=3, grid=(3, 5), noncontiguous=True),
    _case(Variant(act_after_fc1="gelu", scale=True, drop_path=0.5), batch=4, frames=2, prefix=0, kt=3),
    # KT > 3: the recompute's narrower tile (adapter_fwd.down_conv_forward)
    _case(Variant(act_after_fc1="quick_gelu", act_after_conv="gelu", scale=True, drop_path=0.5), batch=4, frames=8,
          prefix=1, kt=5),
    _case(Variant(act_after_fc1="quick_gelu", act_after_conv="gelu", scale=True, drop_path=0.3), batch=4,
          frames=1, prefix=2, kt=1, bias=False),
    # prefix_mode="mlp": prefix rows through fc1 -> acts -> fc2 (the KT = 0 launches); P = 0 is skip's
    _case(Variant(prefix_mode="mlp"), frames=2, prefix=1, kt=3),
    _case(MLP_COMBINED, batch=4, frames=8, prefix=2, kt=3, noncontiguous=True),
    _case(Variant(prefix_mode="mlp", act_after_fc1="gelu", scale=True), frames=1, prefix=1, kt=1, bias=False),
    _case(Variant(prefix_mode="mlp", act_after_conv="gelu"), frames=2, prefix=0, kt=5),
]
FULL_CASES = [
    _case(v, batch=4, frames=t, prefix=i % 3, kt=kt, noncontiguous=i % 2 == 1)
    for i, (v, kt, t) in enumerate(
        (v, kt, t)
        for v in (Variant(act_after_fc1="gelu"), Variant(act_after_fc1="quick_gelu"), Variant(act_after_fc1="relu"),
                  Variant(act_after_conv="gelu"), Variant(act_after_conv="quick_gelu"),
                  Variant(act_after_conv="relu"), Variant(scale=True), Variant(drop_path=0.5), COMBINED,
                  Variant(prefix_mode="mlp"), MLP_COMBINED,
                  Variant(prefix_mode="mlp", act_after_fc1="quick_gelu", act_after_conv="gelu"))
        for kt in (1, 3, 5) for t in (1, 2, 8))
] if FULL else []
MODES = ["fp32", "bf16", "autocast-bf16"]






def _check(case, mode_name, seed=5):
    # 16-bit runs get cleared ReLU gates, every run an uncancelled d(scale) (parity.condition_inputs;
    # fp32 runs keep their random ReLU inputs)
    inputs = parity.condition_inputs(case, parity.make_inputs(case, seed=seed), sixteen_bit=mode_name != "fp32",
                                     device=DEVICE)
    got = check_fused_switches(case, inputs, mode_name, DEVICE)
    assert ("scale" in got) == case.variant.scale


@pytest.mark.parametrize("mode_name", MODES)
@pytest.mark.parametrize("case", CASES + FULL_CASES, ids=[c.label() for c in CASES + FULL_CASES])
def test_fused_switch_parity(case, mode_name):
    _check(case, mode_name)


def test_cases_cover_the_fused_switches():
    variants = {c.variant for c in CASES}
    for name in ("act_after_fc1", "act_after_conv"):
        for act in ("gelu", "quick_gelu", "relu"):
            assert Variant(**{name: act}) in variants
    assert Variant(scale=True) in variants and Variant(drop_path=0.5) in variants and COMBINED in variants
    assert {c.prefix for c in CASES} == {0, 1, 2} and {c.frames for c in CASES} == {1, 2, 8}
    assert {c.kernel[0] for c in CASES} == {1, 3, 5}
    assert any(c.noncontiguous for c in CASES) and any(not c.bias for c in CASES)


MLP_MULTI_TILE = Variant(act_after_fc1="gelu", prefix_mode="mlp", scale=True, drop_path=0.5)


# the mlp case in fp32 only (~20 s each in the interpreter; its tiling does not depend on the dtype)
@pytest.mark.parametrize("variant,mode_name", [(COMBINED, "fp32"), (COMBINED, "bf16"), (MLP_MULTI_TILE, "fp32")],
                         ids=["base-fp32", "base-bf16", "mlp-fp32"])
def test_multi_tile_runs_and_splits(mode_name, variant):
    """Several row and channel tiles, K blocks, frame runs with halos and wgrad token splits: the
    d(scale) partials of every conv-backward program and every (split, C block) of the bias
    share, and halo frames' pre-activations. With prefix_mode="mlp": 80 prefix rows (two row
    tiles, clips straddling them) launched as 1-frame clips, DropPath's clip = row // (P*T)."""
    from st_adapter_fast.kernels import tuning

    mlp = variant.prefix_mode == "mlp"
    case = Case(batch=5 if mlp else 2, frames=8, grid=(7, 5) if not mlp else (3, 5), prefix=2 if mlp else 1,
                channels=40, adapter_channels=72, kernel=(3, 1, 1), variant=variant)
    with tuning.override(runs=3, splits=3):
        _check(case, mode_name)


def test_drop_path_draw_is_the_references_mask():
    """One seed, one mask: the fused op's draw is bitwise reference.drop_path_mask's, and a fused
    and a reference run from one seed drop the same clips (the branch of a dropped clip is 0)."""
    for p in (0.1, 0.5):
        torch.manual_seed(7)
        draw = ops.drop_path_draw(40, p, DEVICE)
        torch.manual_seed(7)
        mask = drop_path_mask(40, p, torch.zeros((), device=DEVICE))
        assert draw.dtype == torch.float32 and draw.shape == (40,)
        assert torch.equal(draw / (1 - p), mask.flatten()) and 0 < int(draw.sum()) < 40
    m = STAdapter(8, 4, (3, 1, 1), scale=0.7, drop_path=0.5, act_after_conv="gelu").to(DEVICE).train()
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(16 * 2, 5, 8, device=DEVICE)
    dropped = {}
    for backend in ("triton", "reference"):
        m.backend = backend
        torch.manual_seed(11)
        branch = (m(x, 2) - x).reshape(16, -1)
        dropped[backend] = (branch.abs().sum(1) == 0).tolist()
    assert dropped["triton"] == dropped["reference"] and 0 < sum(dropped["triton"]) < 16


# the fused switch sets beyond the activations/scale/DropPath base each adds (a module kwarg set)
FUSED_EXTRAS = {"base": {}, "mlp": dict(prefix_mode="mlp"), "norm": dict(norm="layernorm"),
                "norm-mlp": dict(norm="layernorm", prefix_mode="mlp")}


@pytest.mark.parametrize("extra", list(FUSED_EXTRAS))
def test_runs_fused_without_fallback_and_saves_only_inputs(monkeypatch, extra):
    """With x's device offered to the fused backends (as CUDA tensors are), "auto" runs these
    switches on Triton -- no fallback warning, the explicit backend's result bitwise -- and only
    x, the parameters (scale included) and the (B,) DropPath draw are saved for backward."""
    monkeypatch.setattr(ops, "AUTO_FUSED_DEVICES", ("cuda", DEVICE))
    monkeypatch.setattr(ops, "_WARNED", set())
    kwargs = dict(kernel_size=(3, 1, 1), **FUSED_EXTRAS[extra])
    m = STAdapter(16, 8, act_after_fc1="gelu", act_after_conv="quick_gelu", scale=0.5,
                  drop_path=0.3, **kwargs).to(DEVICE).train()
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(4 * 2, 10, 16, device=DEVICE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback warning fails the test
        assert ops.resolve_backend("auto", x, kwargs["kernel_size"], torch.float32, m.variant) == "triton"
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


@pytest.mark.parametrize("kwargs,named", [
    (dict(kernel_size=(3, 9, 3)), r"kernel_size \(3, 9, 3\): spatial kernels up to kh, kw = 7"),
], ids=["spatial"])
def test_triton_still_refuses_the_rest_by_name(kwargs, named):
    m = STAdapter(8, 4, backend="triton", act_after_fc1="gelu", scale=0.5, **kwargs).to(DEVICE)
    with pytest.raises(RuntimeError, match=f"backend='triton' cannot run this call: .*{named}"):
        m(torch.randn(4, 5, 8, device=DEVICE), 2)


def _op_args(scale=True, drop=True):
    case = Case(batch=2, frames=2, grid=(2, 2), channels=16, adapter_channels=16)
    inp = parity.make_inputs(case)
    x = inp["x"].float().to(DEVICE).requires_grad_()
    params = [inp[n].float().to(DEVICE).requires_grad_() for n in parity.PARAM_NAMES]
    s = torch.tensor(0.7, device=DEVICE, requires_grad=True) if scale else None
    draw = torch.tensor([0.0, 1.0], device=DEVICE) if drop else None
    return x, params, s, draw


def test_opcheck_with_switches():
    x, params, s, draw = _op_args()
    args = (x, *params, 2, 1, "triton", s, draw, 0.5, "gelu", "relu")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter.default, args)
    bwd = (torch.randn_like(x), x.detach(), *[p.detach() for p in params], 2, 1, "triton", s.detach(), draw, 0.5,
           "gelu", "relu")
    torch.library.opcheck(torch.ops.st_adapter_fast.fused_adapter_backward.default, bwd)


def test_compile_fullgraph_fused_switches_match_eager():
    """The fused switches trace without graph breaks; the compiled run draws the same mask."""
    m = STAdapter(16, 8, (3, 1, 1), backend="triton", act_after_fc1="gelu", act_after_conv="relu", scale=0.5,
                  drop_path=0.5).to(DEVICE).train()
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(6 * 2, 10, 16, device=DEVICE, requires_grad=True)
    compiled = torch.compile(lambda t: m(t, 2), fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    got = compiled(x)
    got.square().sum().backward()
    grads = [x.grad.clone()] + [q.grad.clone() for q in m.parameters()]
    x.grad = None
    m.zero_grad()
    torch.manual_seed(2)
    want = m(x, 2)
    want.square().sum().backward()
    assert torch.equal(got, want)
    for a, b in zip(grads, [x.grad] + [q.grad for q in m.parameters()]):
        assert torch.equal(a, b)
    per_clip = (got - x).detach().reshape(6, -1).abs().sum(1)
    assert (per_clip == 0).any() and (per_clip > 0).any(), per_clip


def test_meta_tensors_with_fused_switches():
    m = STAdapter(16, 8, backend="triton", act_after_fc1="relu", act_after_conv="gelu", scale=0.5,
                  drop_path=0.2).to("meta").train()
    x = torch.empty(6, 10, 16, device="meta", requires_grad=True)
    out = m(x, 3)
    assert out.device.type == "meta" and out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and m.scale.grad.shape == () and m.scale.grad.device.type == "meta"


def test_meta_tensors_with_every_switch_at_once():
    """MMAction2's module plus a pre-norm, on Triton: meta in, meta out (the registered fake),
    backward too -- the norm affine's and scale's grads included."""
    m = STAdapter(16, 8, (3, 3, 3), backend="triton", norm="layernorm", act_after_fc1="gelu",
                  act_after_conv="relu", prefix_mode="mlp", scale=0.0, drop_path=0.1).to("meta").train()
    x = torch.empty(6, 1 + 9, 16, device="meta", requires_grad=True)
    out = m(x, 3)
    assert out.device.type == "meta" and out.shape == x.shape
    out.sum().backward()
    assert x.grad.shape == x.shape and m.norm.weight.grad.shape == (16,) and m.scale.grad.device.type == "meta"


@pytest.mark.parametrize("prefix_mlp", [False, True], ids=["skip", "mlp"])
def test_launch_budget_with_every_fused_switch(prefix_mlp):
    """Forward: the two kernels plus DropPath's one RNG op (bernoulli_); backward: the official
    five launches (recompute, conv backward, dgrad, wgrad, finalize), no torch op between --
    counted as the work model counts (kernels recorded on meta tensors, every launching torch op).
    prefix_mode="mlp" adds one KT = 0 down-conv launch to the forward and to the recompute, and
    one KT = 0 conv-backward launch (the prefix rows)."""
    from st_adapter_fast.kernels import adapter_bwd, adapter_fwd, aot, work_model

    b, t, seq, c, ca = 2, 8, 197, 768, 384  # shape A's per-clip sizes, two clips
    meta = dict(device="meta", dtype=torch.bfloat16)
    x = torch.empty(b * t, seq, c, **meta)
    params = [torch.empty(ca, c, **meta), torch.empty(ca, **meta), torch.empty(ca, 3, **meta),
              torch.empty(ca, **meta), torch.empty(c, ca, **meta), torch.empty(c, **meta)]
    counts = {}
    saved_draw = ops.drop_path_draw(b, 0.1, "meta")  # what backward gets (saved by the forward)
    for pass_name in ("fwd", "bwd"):
        events, sink = [], []
        with aot._recording(90, sink, events), work_model._OpCapture(events):
            draw = ops.drop_path_draw(b, 0.1, "meta") if pass_name == "fwd" else saved_draw
            switches = dict(act_after_fc1="gelu", act_after_conv="relu", scale=torch.empty((), **meta),
                            drop_draw=draw, drop_path=0.1, prefix_mlp=prefix_mlp)
            if pass_name == "fwd":
                adapter_fwd.adapter_forward(x, t, 1, *params, **switches)
            else:
                grads = adapter_bwd.adapter_backward(x, x, t, 1, *params, **switches)
                assert len(grads) == 8 and grads[7].shape == ()
        counts[pass_name] = [getattr(e, "name", None) or e.variant.kernel for e in events]
    down = ["adapter_down_conv_fwd_kernel"] * (2 if prefix_mlp else 1)
    conv = ["adapter_conv_bwd_kernel"] * (2 if prefix_mlp else 1)
    assert counts["fwd"] == ["aten.bernoulli_", *down, "adapter_up_residual_fwd_kernel"], counts["fwd"]
    assert counts["bwd"] == [*down, *conv, "adapter_up_residual_fwd_kernel", "adapter_wgrad_kernel",
                             "adapter_grad_finalize_kernel"], counts["bwd"]


def test_inplace_with_fused_switches_matches_out_of_place():
    w = [t.to(DEVICE) for t in _op_args(scale=False, drop=False)[1]]
    x = torch.randn(2 * 2, 5, 16, device=DEVICE)
    kw = dict(backend="triton", act_after_fc1="quick_gelu", act_after_conv="gelu",
              scale=torch.tensor(0.6, device=DEVICE), drop_path=0.5, training=True)
    with torch.no_grad():
        torch.manual_seed(4)
        want = st_adapter(x, 2, *w, **kw)
        y = x.clone()
        torch.manual_seed(4)
        got = st_adapter(y, 2, *w, inplace=True, **kw)
    assert got is y and torch.equal(got, want)
