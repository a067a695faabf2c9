"""docs/design.md §9 variants: the reference against an independent plain-PyTorch definition,
STAdapter's switches, DropPath, meta tensors, and dispatch (fused backends refuse the switches
they do not fuse by name; "auto" falls back to the reference with one warning). The Triton
backend's fused switches (activations, scale, DropPath) are checked in test_variants_fused.py.

The variants grid runs its covering subset here (~1 s); ST_ADAPTER_FAST_FULL_GRID=1 runs all
of parity.variant_grid(full=True) (108 cases, ~20 s on 2 CPU cores).
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch

from st_adapter_fast import STAdapter, parity, reference, st_adapter
from st_adapter_fast import ops
from st_adapter_fast.backends import Backend, get_backend, register_backend, unregister_backend
from st_adapter_fast.variants import Variant

from helpers import fused_device, requires_cuda, triton_interpreter_on

FULL = os.environ.get("ST_ADAPTER_FAST_FULL_GRID", "0") == "1"
DEVICE = fused_device()
fused_ok = pytest.mark.skipif(
    DEVICE == "cpu" and not triton_interpreter_on(), reason="needs CUDA or TRITON_INTERPRET=1"
)


# ----------------------------------------------------------- the independent definition
def _act(name, t):
    if name is None:
        return t
    if name == "gelu":  # erf GELU
        return 0.5 * t * (1.0 + torch.erf(t / math.sqrt(2.0)))
    if name == "quick_gelu":
        return t / (1.0 + torch.exp(-1.702 * t))
    if name == "relu":
        return torch.where(t > 0, t, torch.zeros_like(t))
    raise AssertionError(name)


def _depthwise_conv(h, weight, bias):
    """h (B, T, H, W, Ca), weight (Ca, 1, kt, kh, kw): a sum of shifted copies of a zero-padded
    h, one per tap -- no conv op."""
    b, t, hh, ww, ca = h.shape
    kt, kh, kw = weight.shape[2:]
    pt, ph, pw = kt // 2, kh // 2, kw // 2
    padded = h.new_zeros(b, t + 2 * pt, hh + 2 * ph, ww + 2 * pw, ca)
    padded[:, pt:pt + t, ph:ph + hh, pw:pw + ww] = h
    out = h.new_zeros(h.shape) if bias is None else bias.expand(h.shape).clone()
    for dt in range(kt):
        for di in range(kh):
            for dj in range(kw):
                out = out + weight[:, 0, dt, di, dj] * padded[:, dt:dt + t, di:di + hh, dj:dj + ww]
    return out


def definition(x, T, w1, b1, wc, bc, w2, b2, *, prefix, grid, variant, norm_weight=None, norm_bias=None,
               scale=None, keep=None):
    """docs/design.md §9 written out: keep is the (B,) per-clip DropPath factor or None."""
    bt, seq_len, c = x.shape
    b = bt // T
    hh, ww = grid
    z = x
    if variant.norm == "layernorm":
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        z = (x - mean) / torch.sqrt(var + 1e-5)
        if norm_weight is not None:
            z = z * norm_weight
        if norm_bias is not None:
            z = z + norm_bias
    h = z @ w1.t() + (0 if b1 is None else b1)  # every row; the skip mode ignores the prefix ones
    h = _act(variant.act_after_fc1, h)
    spatial = h[:, prefix:].reshape(b, T, hh, ww, -1)
    g_s = _act(variant.act_after_conv, _depthwise_conv(spatial, wc, bc)).reshape(bt, hh * ww, -1)
    y_s = g_s @ w2.t() + (0 if b2 is None else b2)
    y_p = _act(variant.act_after_conv, h[:, :prefix]) @ w2.t() + (0 if b2 is None else b2)
    branch = torch.cat([y_p if variant.prefix_mode == "mlp" else torch.zeros_like(y_p), y_s], dim=1)
    if keep is not None:
        branch = branch * keep.repeat_interleave(T)[:, None, None]
    if scale is not None:
        branch = scale * branch
    return x + branch


def _keep(case):
    """The per-clip factors a DropPath case's runs draw (parity seeds DROP_PATH_SEED)."""
    p = case.variant.drop_path
    torch.manual_seed(parity.DROP_PATH_SEED)
    drawn = torch.empty(case.batch, 1, 1, 1, dtype=torch.float32).bernoulli_(1 - p)  # one per clip
    return drawn.flatten().double() / (1 - p)


GRID = parity.variant_grid(full=FULL)


def test_variant_grid_covers_design_section_9():
    full = parity.variant_grid(full=True)
    for cases in (GRID, full):
        variants = {c.variant for c in cases}
        for switch in (Variant(norm="layernorm"), Variant(prefix_mode="mlp"), Variant(scale=True),
                       Variant(drop_path=0.5), parity.MMACTION2,
                       *[Variant(act_after_fc1=a) for a in ("gelu", "quick_gelu", "relu")],
                       *[Variant(act_after_conv=a) for a in ("gelu", "quick_gelu", "relu")]):
            assert switch in variants, switch
        assert {c.prefix for c in cases} == {0, 1, 2}
        assert {c.frames for c in cases} == {1, 2, 8}
        assert {c.kernel for c in cases} >= {(1, 3, 3), (3, 3, 3), (5, 3, 3)}
        assert any(c.grid[0] != c.grid[1] for c in cases)
        assert any(c.variant == parity.MMACTION2 and c.kernel == (3, 3, 3) for c in cases)
        # every case takes a switch or a kernel beyond the official op, so no backend passes one by running it
        assert all(c.kernel[1:] != (1, 1) or not c.variant.official for c in cases)
    # the full grid crosses every variant with every kernel and T, P cycling within each
    assert len({(c.variant, c.kernel, c.frames) for c in full}) == 12 * 9
    assert len({(c.frames, c.prefix) for c in full}) == 9


@pytest.mark.parametrize("case", GRID, ids=[c.label() for c in GRID])
def test_reference_matches_definition(case):
    """float64: output and the gradient of x and every parameter (LayerNorm affine and scale
    included) against the written-out definition."""
    inputs = parity.make_inputs(case, seed=11)
    got = parity.reference64(case, inputs)
    keep = _keep(case) if case.variant.drop_path > 0 else None
    if keep is not None:  # the seed must give a case that can tell a mask from none
        assert (keep == 0).any() and (keep > 0).any(), keep

    names = ["x", *parity.PARAM_NAMES, *parity.VARIANT_PARAM_NAMES]
    leaves = {n: inputs[n].clone().requires_grad_() for n in names if inputs.get(n) is not None}
    want_out = definition(
        leaves["x"], case.frames, *[leaves.get(n) for n in parity.PARAM_NAMES], prefix=case.prefix,
        grid=case.grid, variant=case.variant, norm_weight=leaves.get("norm_weight"),
        norm_bias=leaves.get("norm_bias"), scale=leaves.get("scale"), keep=keep)
    want_out.backward(inputs["grad_out"])
    want = {"out": want_out.detach(), **{n: t.grad for n, t in leaves.items()}}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-9, atol=1e-11, msg=lambda m: f"{name}: {m}")


# ------------------------------------------------------------------------------ the module
def test_module_children_and_defaults():
    official = STAdapter(12, 8)
    assert official.norm is None and official.scale is None
    assert set(official.state_dict()) == {f"{m}.{k}" for m in ("fc1", "conv", "fc2") for k in ("weight", "bias")}
    m = STAdapter(12, 8, (3, 3, 3), norm="layernorm", act_after_fc1="gelu", act_after_conv="relu",
                  prefix_mode="mlp", scale=0.25, drop_path=0.1)
    assert isinstance(m.norm, torch.nn.LayerNorm) and m.norm.eps == 1e-5
    assert m.norm.normalized_shape == (12,)
    assert isinstance(m.scale, torch.nn.Parameter) and m.scale.shape == () and m.scale.item() == 0.25
    assert set(m.state_dict()) == set(official.state_dict()) | {"norm.weight", "norm.bias", "scale"}
    assert m.eval().variant == Variant("layernorm", "gelu", "relu", "mlp", True, 0.0)  # eval: no DropPath
    assert m.train().variant.drop_path == 0.1
    text = repr(m)
    for word in ("act_after_fc1='gelu'", "act_after_conv='relu'", "prefix_mode='mlp'", "drop_path=0.1"):
        assert word in text


def test_explicit_official_switches_are_bitwise_the_default():
    torch.manual_seed(1)
    a = STAdapter(12, 8)
    b = STAdapter(12, 8, norm=None, act_after_fc1=None, act_after_conv=None, prefix_mode="skip", scale=None,
                  drop_path=0.0)
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 10, 12)
    a.train(), b.train()
    assert torch.equal(a(x, 3), b(x, 3))
    w = [a.fc1.weight, a.fc1.bias, a.conv.weight, a.conv.bias, a.fc2.weight, a.fc2.bias]
    assert torch.equal(st_adapter(x, 3, *w), st_adapter(x, 3, *w, prefix_mode="skip", drop_path=0.0, training=True))


def test_module_matches_the_functional_op_with_grads():
    torch.manual_seed(2)
    m = STAdapter(12, 8, (3, 3, 3), num_prefix_tokens=2, grid_size=(2, 3), norm="layernorm",
                  act_after_fc1="quick_gelu", prefix_mode="mlp", scale=0.5).double()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 8, 12, dtype=torch.float64, requires_grad=True)
    out = m(x, 2)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    assert set(grads) >= {"norm.weight", "norm.bias", "scale"}
    assert all(g.abs().sum() > 0 for g in grads.values())
    x2 = x.detach().clone().requires_grad_()
    want = reference(x2, 2, m.fc1.weight, m.fc1.bias, m.conv.weight, m.conv.bias, m.fc2.weight, m.fc2.bias,
                     num_prefix_tokens=2, grid_size=(2, 3), norm="layernorm", norm_weight=m.norm.weight,
                     norm_bias=m.norm.bias, act_after_fc1="quick_gelu", prefix_mode="mlp", scale=m.scale)
    assert torch.equal(out, want)


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(norm="batchnorm"), ValueError, ["norm", "'batchnorm'", "layernorm"]),
    (dict(act_after_fc1="swish"), ValueError, ["act_after_fc1", "'swish'", "quick_gelu"]),
    (dict(act_after_conv="tanh"), ValueError, ["act_after_conv", "'tanh'"]),
    (dict(prefix_mode="conv"), ValueError, ["prefix_mode", "'conv'", "mlp"]),
    (dict(drop_path=1.0), ValueError, ["drop_path", "[0, 1)", "1.0"]),
    (dict(scale="0"), TypeError, ["scale", "'0'"]),
], ids=["norm", "act1", "act2", "prefix", "drop_path", "scale"])
def test_module_rejects_unknown_switches(kwargs, exc, words):
    with pytest.raises(exc) as info:
        STAdapter(8, 4, **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def _weights(c=8, ca=4, kernel=(3, 1, 1)):
    m = STAdapter(c, ca, kernel)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return [p.detach() for p in (m.fc1.weight, m.fc1.bias, m.conv.weight, m.conv.bias, m.fc2.weight, m.fc2.bias)]


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(norm="layernorm", norm_weight=torch.ones(7)), ValueError, ["norm_weight", "(8,)", "(7,)"]),
    (dict(norm_weight=torch.ones(8)), ValueError, ["norm_weight", "norm is None"]),
    (dict(scale=torch.ones(1)), ValueError, ["scale", "()", "(1,)"]),
    (dict(scale=0.5), TypeError, ["scale", "torch.Tensor", "float"]),
    (dict(scale=torch.ones((), dtype=torch.float64)), TypeError, ["scale", "float64", "float32"]),
    (dict(scale=torch.ones((), device="meta")), ValueError, ["scale", "meta", "cpu"]),
    (dict(drop_path=-0.1, training=True), ValueError, ["drop_path", "-0.1"]),
    (dict(act_after_conv="elu"), ValueError, ["act_after_conv", "'elu'"]),
], ids=["norm-shape", "norm-without-switch", "scale-shape", "scale-float", "scale-dtype", "scale-device",
        "drop_path", "act"])
def test_op_rejects_bad_variant_inputs(kwargs, exc, words):
    with pytest.raises(exc) as info:
        st_adapter(torch.randn(4, 5, 8), 2, *_weights(), **kwargs)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_prefix_only_frames_go_through_the_mlp():
    """L = P (no spatial tokens): prefix_mode="mlp" still adapts the prefix rows, without a conv."""
    w1, b1, wc, bc, w2, b2 = [t.double() for t in _weights()]
    x = torch.randn(4, 1, 8, dtype=torch.float64)
    got = reference(x, 2, w1, b1, wc, bc, w2, b2, prefix_mode="mlp", act_after_fc1="relu",
                    act_after_conv="gelu")
    want = x + _act("gelu", _act("relu", x @ w1.t() + b1)) @ w2.t() + b2
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(reference(x, 2, w1, b1, wc, bc, w2, b2), x)  # skip: a copy
    with pytest.raises(ValueError, match="prefix_mode"):
        reference(x, 2, w1, b1, wc, bc, w2, b2, prefix_mode="MLP")


# -------------------------------------------------------------------------------- DropPath
def _drop_adapter(p, clips=64, frames=3):
    torch.manual_seed(5)
    m = STAdapter(12, 8, (3, 1, 1), drop_path=p, scale=0.7)
    for q in m.parameters():
        torch.nn.init.normal_(q, std=0.3)
    x = torch.randn(clips * frames, 1 + 9, 12)
    return m, x


def test_drop_path_mask_is_per_clip():
    p = 0.4
    m, x = _drop_adapter(p)
    clips, frames = 64, 3
    branch_eval = (m.eval()(x, frames) - x).reshape(clips, frames, 10, 12)
    m.train()
    torch.manual_seed(9)
    branch = (m(x, frames) - x).reshape(clips, frames, 10, 12)
    kept = [bool(branch[i].abs().sum() > 0) for i in range(clips)]
    for i in range(clips):  # every frame and token of a clip is dropped or kept together
        want = branch_eval[i] / (1 - p) if kept[i] else torch.zeros_like(branch_eval[i])
        torch.testing.assert_close(branch[i], want, rtol=1e-6, atol=1e-6)
    assert 0 < sum(kept) < clips
    # the prefix token (skip mode) is never touched, dropped or not
    assert torch.equal(branch[:, :, 0], torch.zeros_like(branch[:, :, 0]))


def test_drop_path_backward_follows_the_mask():
    m, x = _drop_adapter(0.5, clips=16)
    m.train()
    x = x.requires_grad_()
    torch.manual_seed(4)
    out = m(x, 3)
    dropped = [i for i in range(16) if torch.equal(out[3 * i:3 * i + 3], x[3 * i:3 * i + 3])]
    assert 0 < len(dropped) < 16
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    for i in dropped:  # a dropped clip's branch contributes nothing: dx is the identity's
        assert torch.equal(x.grad[3 * i:3 * i + 3], grad_out[3 * i:3 * i + 3])


def test_drop_path_preserves_the_expected_value():
    """Mean over clips x draws of branch_train / branch_eval is 1 (the 1/(1-p) rescaling) and the
    dropped fraction is p, each within 4 standard errors: a missing rescale (mean 1-p) or a
    wrong rate fails."""
    p, clips, draws = 0.3, 32, 125
    m, x = _drop_adapter(p, clips=clips, frames=2)
    with torch.no_grad():
        ref = (m.eval()(x, 2) - x).reshape(clips, -1)
        m.train()
        torch.manual_seed(21)
        factors = []
        for _ in range(draws):
            branch = (m(x, 2) - x).reshape(clips, -1)
            factors.append((branch * ref).sum(1) / (ref * ref).sum(1))  # per clip: 0 or 1/(1-p)
    f = torch.stack(factors).flatten()
    n = f.numel()
    assert torch.all((f.abs() < 1e-5) | ((f - 1 / (1 - p)).abs() < 1e-4)), "factors other than 0 and 1/(1-p)"
    mean_se = math.sqrt(p / (1 - p) / n)  # the factor's variance is p / (1 - p)
    assert abs(f.mean().item() - 1.0) < 4 * mean_se, (f.mean().item(), mean_se)
    drop_rate = (f.abs() < 1e-5).double().mean().item()
    assert abs(drop_rate - p) < 4 * math.sqrt(p * (1 - p) / n), drop_rate


def test_drop_path_seeded_runs_repeat_bitwise_and_eval_is_identity():
    m, x = _drop_adapter(0.5, clips=16)
    m.train()

    def run(seed):
        m.zero_grad()
        torch.manual_seed(seed)
        xx = x.clone().requires_grad_()
        out = m(xx, 3)
        out.square().sum().backward()
        return [out.detach(), xx.grad] + [q.grad.clone() for q in m.parameters()]

    a, b, c = run(7), run(7), run(8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0], c[0])  # another seed drops other clips (16 clips: P(same) = 2^-16)
    m.eval()
    plain = STAdapter(12, 8, (3, 1, 1), scale=0.7)
    plain.load_state_dict(m.state_dict())
    with torch.no_grad():
        assert torch.equal(m(x, 3), plain.eval()(x, 3))


def test_drop_path_mask_is_the_same_in_every_dtype():
    from st_adapter_fast.reference import drop_path_mask

    masks = []
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        torch.manual_seed(3)
        masks.append((drop_path_mask(40, 0.5, torch.zeros((), dtype=dtype)).flatten() != 0).tolist())
    assert all(mk == masks[0] for mk in masks) and 0 < sum(masks[0]) < 40


# ---------------------------------------------------------------------------- meta tensors
@pytest.mark.parametrize("backend", ["auto", "reference", "triton", "cuda"])
def test_meta_tensors_give_meta_results(backend):
    m = STAdapter(16, 8, backend=backend).to("meta")
    x = torch.empty(6, 1 + 9, 16, device="meta", requires_grad=True)
    out = m(x, 3)
    assert out.device.type == "meta" and out.shape == x.shape and out.dtype == x.dtype
    out.sum().backward()  # the backward runs on meta too (the fused path: its registered fake)
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape
    # a variant: the reference computes it on meta; a named fused backend refuses it by name
    # (kh = 9: beyond what Triton fuses; the CUDA backend fuses no spatial kernel)
    v = STAdapter(16, 8, (3, 9, 3), backend=backend, norm="layernorm", prefix_mode="mlp", scale=0.0).to("meta")
    if backend in ("auto", "reference"):
        assert v(x, 3).shape == x.shape and v(x, 3).device.type == "meta"
    else:
        with pytest.raises(RuntimeError, match=r"kernel_size \(3, 9, 3\)"):
            v(x, 3)


def test_meta_through_the_registered_fake():
    args = [torch.empty(6, 10, 16, device="meta"), torch.empty(8, 16, device="meta"), torch.empty(8, device="meta"),
            torch.empty(8, 1, 3, 1, 1, device="meta"), torch.empty(8, device="meta"),
            torch.empty(16, 8, device="meta"), torch.empty(16, device="meta")]
    out = torch.ops.st_adapter_fast.fused_adapter(*args, 3, 1, "triton")
    assert out.device.type == "meta" and out.shape == (6, 10, 16)


@fused_ok
def test_fake_tensor_mode_through_the_fused_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(6, 10, 16, device=DEVICE)
        w = [torch.empty(8, 16, device=DEVICE), torch.empty(8, device=DEVICE),
             torch.empty(8, 1, 3, 1, 1, device=DEVICE), torch.empty(8, device=DEVICE),
             torch.empty(16, 8, device=DEVICE), torch.empty(16, device=DEVICE)]
        out = st_adapter(x, 3, *w, backend="triton")
        ref = st_adapter(x, 3, *w, backend="reference", act_after_fc1="gelu", prefix_mode="mlp")
    assert out.shape == ref.shape == (6, 10, 16)


# --------------------------------------------------------------------------------- dispatch
SWITCHES = [
    (dict(norm="layernorm"), "norm='layernorm'"),
    (dict(act_after_fc1="gelu"), "act_after_fc1='gelu'"),
    (dict(act_after_conv="relu"), "act_after_conv='relu'"),
    (dict(prefix_mode="mlp"), "prefix_mode='mlp'"),
    (dict(scale=0.5), "scale"),
    (dict(drop_path=0.2), "drop_path=0.2"),
]
# what each fused backend still refuses: CUDA every switch, Triton those it does not fuse yet --
# none of these (the activations, scale, DropPath, prefix_mode="mlp": test_variants_fused.py;
# norm: test_prenorm_fused.py; only spatial kernels, refused in test_variants_fused.py)
TRITON_REFUSES = ()
REFUSALS = [("cuda", kw, named) for kw, named in SWITCHES] + [
    ("triton", kw, named) for kw, named in SWITCHES if named in TRITON_REFUSES]


@pytest.mark.parametrize("backend,kwargs,named", REFUSALS, ids=[f"{b}-{n}" for b, _, n in REFUSALS])
def test_explicit_fused_backend_refuses_the_switch_by_name(backend, kwargs, named):
    if backend == "triton" and DEVICE == "cpu" and not triton_interpreter_on():
        pytest.skip("the Triton backend needs CUDA or TRITON_INTERPRET=1 to get to the case checks")
    m = STAdapter(8, 4, backend=backend, **kwargs).to(DEVICE).train()
    with pytest.raises(RuntimeError) as info:
        m(torch.randn(4, 5, 8, device=DEVICE), 2)
    assert f"backend={backend!r}" in str(info.value) and named in str(info.value), str(info.value)


@fused_ok
def test_drop_path_in_eval_mode_runs_fused():
    m = STAdapter(8, 4, backend="triton", drop_path=0.2).to(DEVICE).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(4, 5, 8, device=DEVICE)
    m.backend = "reference"
    want = m(x, 2)
    m.backend = "triton"
    torch.testing.assert_close(m(x, 2), want, rtol=1e-4, atol=1e-4)


@fused_ok
def test_auto_falls_back_once_naming_the_switch(monkeypatch):
    """CPU twin of the GPU behaviour: with x's device offered to the fused backends (as CUDA
    tensors are), an official call picks Triton; a variant beyond every fused backend (kt = 11 is
    past Triton's window, the switch past CUDA's) falls back with one warning naming the case."""
    monkeypatch.setattr(ops, "AUTO_FUSED_DEVICES", ("cuda", DEVICE))
    monkeypatch.setattr(ops, "_WARNED", set())
    x = torch.randn(4, 5, 8, device=DEVICE)
    w = [t.to(DEVICE) for t in _weights(kernel=(11, 1, 1))]
    assert ops.resolve_backend("auto", x, (3, 1, 1), torch.float32) == "triton"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = st_adapter(x, 2, *w, prefix_mode="mlp")
        st_adapter(x, 2, *w, prefix_mode="mlp")
    msgs = [str(c.message) for c in caught if "no fused backend" in str(c.message)]
    assert len(msgs) == 1 and "kernel_size (11, 1, 1)" in msgs[0], msgs
    torch.testing.assert_close(got, reference(x, 2, *w, prefix_mode="mlp"), rtol=0, atol=0)


@requires_cuda  # auto offers CUDA tensors to the fused backends
def test_auto_falls_back_once_naming_the_switch_gpu():
    ops._WARNED.clear()
    x = torch.randn(4, 5, 8, device="cuda")
    w = [t.cuda() for t in _weights(kernel=(11, 1, 1))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        st_adapter(x, 2, *w, prefix_mode="mlp")
        st_adapter(x, 2, *w, prefix_mode="mlp")
    msgs = [str(c.message) for c in caught if "no fused backend" in str(c.message)]
    assert len(msgs) == 1 and "kernel_size (11, 1, 1)" in msgs[0] and "prefix_mode='mlp'" in msgs[0], msgs


def test_backends_without_variant_support_keep_their_interface():
    """A backend registered the old way (3-argument unavailable_reason, no variant_aware) still
    serves official calls and is refused every switch by name, without being asked."""
    calls = []

    def why(x, kernel_size, dtype):
        calls.append(kernel_size)
        return "always unavailable (test backend)"

    register_backend(Backend("test_old_style", why, None, None, auto=False), replace=True)
    try:
        x = torch.randn(4, 5, 8)
        with pytest.raises(RuntimeError, match="always unavailable"):
            st_adapter(x, 2, *_weights(), backend="test_old_style")
        with pytest.raises(RuntimeError, match=r"test_old_style backend fuses only the official switches, "
                                               r"not norm='layernorm', scale"):
            st_adapter(x, 2, *_weights(), backend="test_old_style", norm="layernorm", scale=torch.ones(()))
        assert len(calls) == 1
    finally:
        unregister_backend("test_old_style")
    assert get_backend("triton").variant_aware and get_backend("cuda").variant_aware


@pytest.mark.parametrize("kwargs,named", [(dict(norm="layernorm"), "norm"),
                                          (dict(prefix_mode="mlp"), "prefix_mlp")], ids=["norm", "mlp"])
def test_a_backend_claiming_variants_cannot_silently_drop_them(kwargs, named):
    """The switches the fused op takes reach the backend's forward as keyword arguments, so a
    backend that claims a switch (its reason says yes) but whose forward lacks the argument
    fails naming it, never computes the adapter without it."""
    def forward_without_norm_or_prefix(x, t, p, wd, bd, taps, bc, wu, bu, *, act_after_fc1=None,
                                       act_after_conv=None, scale=None):
        return x.clone()

    register_backend(Backend("test_claims_all", lambda x, k, d, variant=None: None, forward_without_norm_or_prefix,
                             None, auto=False, variant_aware=True), replace=True)
    try:
        with pytest.raises(TypeError, match=f"unexpected keyword argument '{named}'"):
            st_adapter(torch.randn(4, 5, 8), 2, *_weights(), backend="test_claims_all", act_after_fc1="relu",
                       **kwargs)
    finally:
        unregister_backend("test_claims_all")


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_variant_compiles_fullgraph_and_matches_eager(training):
    """Every switch at once traces without graph breaks (fullgraph=True raises on one); with
    DropPath the compiled run draws the same mask from the same seed."""
    m = STAdapter(16, 8, (3, 3, 3), norm="layernorm", act_after_fc1="gelu", act_after_conv="relu",
                  prefix_mode="mlp", scale=0.5, drop_path=0.5).train(training)
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(6 * 2, 10, 16)
    compiled = torch.compile(lambda t: m(t, 2), fullgraph=True, backend="aot_eager")
    torch.manual_seed(2)
    got = compiled(x)
    torch.manual_seed(2)
    assert torch.equal(got, m(x, 2))
    if training:  # the seed drops some clips and keeps others
        per_clip = (got - x).reshape(6, -1).abs().sum(1)
        assert (per_clip == 0).any() and (per_clip > 0).any(), per_clip


def test_backstop_exemptions_are_named_and_narrow():
    """Only ReLU cases (every tensor) and the scale gradient go without the backstop; the
    ratio-to-eager bound still binds them."""
    relu = parity.Case(kernel=(3, 3, 3), variant=parity.MMACTION2)
    assert set(parity.backstop_exempt(relu)) >= {"out", "x", "fc1_weight", "scale"}
    assert parity.backstop_exempt(parity.Case(kernel=(1, 3, 3), variant=Variant(scale=True))) == ("scale",)
    assert parity.backstop_exempt(parity.Case(kernel=(1, 3, 3), variant=Variant(act_after_fc1="gelu"))) == ()
    assert parity.backstop_exempt(parity.Case()) == ()
    ref = {"scale": torch.tensor(1.0, dtype=torch.float64), "out": torch.ones(3, dtype=torch.float64)}
    eager = {"scale": torch.tensor(1.2, dtype=torch.float64), "out": torch.full((3,), 1.2, dtype=torch.float64)}
    got = {"scale": torch.tensor(1.3, dtype=torch.float64), "out": torch.full((3,), 1.3, dtype=torch.float64)}
    errs = {e.name: e for e in parity.compare(got, ref, eager, torch.bfloat16, exempt=("scale",))}
    assert errs["scale"].passed and not errs["out"].passed  # 0.3 <= 2 * 0.2 + floor; the backstop 0.05 binds "out"
    worse = dict(got, scale=torch.tensor(1.5, dtype=torch.float64))
    errs = {e.name: e for e in parity.compare(worse, ref, eager, torch.bfloat16, exempt=("scale",))}
    assert not errs["scale"].passed  # 0.5 > 2 * 0.2 + 0.008
